//! Generates the gRPC code with the `protoc` shipped inside `protoc-bin-vendored`,
//! so building needs no system protoc.

use std::path::PathBuf;

use tonic_prost_build::Config;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let config = || {
        let mut c = Config::new();
        // Passed to prost-build directly: `std::env::set_var` is unsafe in edition 2024.
        c.protoc_executable(&protoc);
        c
    };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config(), &["proto/leash.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_with_config(
            config(),
            &[PathBuf::from("proto/workload.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
