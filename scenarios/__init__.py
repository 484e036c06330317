"""The world: tasks (data, partitions, models) and the population model."""
