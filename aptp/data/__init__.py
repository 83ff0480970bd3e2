"""Datasets used to train, calibrate and evaluate the models that aptp prunes."""
