"""Scene inputs and outputs of GeoTIFF prediction: reading Sentinel-1/2 onto one grid, writing the results."""
