//! Readers and writers of outside formats: TensorFlow checkpoints and graphs, TFLite flatbuffers.

pub mod tf;
pub mod tflite;
