pub mod rotate;
