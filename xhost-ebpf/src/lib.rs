//! Empty library target: lets xhost-user declare a build-dependency on this crate so cargo rebuilds it when the datapath changes.
#![no_std]
