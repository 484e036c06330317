"""The runtime: config, seeds, pools, local training, the round loop, logs."""
