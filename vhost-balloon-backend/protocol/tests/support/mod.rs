//! What the fuzz targets share (included by path from the backend's tests too).

pub mod cases;
pub mod json;
