//! Graph rewrites more than one stage applies (quantize_int8 fuses before it
//! quantizes; validate fuses the float reference the same way to compare layers).

pub mod fuse;
pub mod fuse_tconv;
pub mod patterns;
