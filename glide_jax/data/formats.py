"""The on-disk formats of prepared datasets.

`FILE_FORMATS` are those `pipeline.RecordSource` reads; `DEFAULT_FILE_FORMAT` is the one
`glide-jax data prepare/build` and the automatic glide_shapes preparation write: an ArrayRecord
split opens from its shard lengths in dataset_info.json alone (each shard's footer is read on its
first access), where a TFRecord split needs a pass over every record header of every shard before
the first read. A module of its own so that the builders and the pipeline share it without
importing each other.
"""
FILE_FORMATS = ("array_record", "tfrecord")
DEFAULT_FILE_FORMAT = "array_record"
