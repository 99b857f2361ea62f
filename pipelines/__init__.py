"""Dataset preparation: raw datasets -> manifest.parquet, classes.parquet and FFCV .beton files."""
