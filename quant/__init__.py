"""Precision: NVFP4/FP8 numerics, recipes, ModelOpt calibration and export, accuracy comparison."""
