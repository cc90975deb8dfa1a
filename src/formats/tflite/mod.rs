//! TFLite flatbuffer writer (and reader for inspection).
