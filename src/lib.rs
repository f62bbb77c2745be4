//! initcrypt as a library: the binary's CLI (src/main.rs) and the fuzz targets use these modules.

pub mod blockdev;
pub mod boot;
pub mod config;
pub mod exit;
mod ffi;
pub mod generator;
pub mod keys;
pub mod keyvol;
pub mod kmsg;
pub mod lifecycle;
pub mod luks;
pub mod pass;
pub mod secret;
pub mod status;
