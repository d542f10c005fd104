"""Building a model and operating on it: create, find and replace the head, freeze, parameter groups, initialise."""
