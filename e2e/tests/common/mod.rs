//! Helpers shared by several e2e test files.

pub mod ec2;
