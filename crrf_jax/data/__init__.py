"""SEN12MS-CR data: GeoTIFF reading, cloud probability, synthetic scenes, TFDS shards and grain pipelines."""
