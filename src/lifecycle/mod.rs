//! Operator commands run in the booted system: enable, disable, rotate, check.

pub mod rotate;
