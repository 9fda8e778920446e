//! Generates the `ensemble.v1` code with `protox` (a pure-Rust protobuf compiler), so building
//! needs no system `protoc`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/ensemble/v1/node.proto", "proto/ensemble/v1/ensemble.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ensemble_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // The per-strategy options double as the `ensemble` extension of the OpenAI-compatible HTTP API.
    let json = "#[derive(serde::Deserialize)] #[serde(default, deny_unknown_fields)]";
    // The trace messages are also the live trace page's JSON (the HTTP face's `/ui/api/generate`).
    let out_json = "#[derive(serde::Serialize)]";
    let mut config = tonic_prost_build::configure();
    for m in [
        "RoundTrace",
        "CandidateTrace",
        "VerifierTrace",
        "CharTrace",
        "CharAltTrace",
        "CharShareTrace",
        "SpanTrace",
        "StageTrace",
    ] {
        config = config.type_attribute(format!("ensemble.v1.{m}"), out_json);
    }
    config
        .type_attribute("ensemble.v1.SpecFuseOptions", json)
        .type_attribute("ensemble.v1.CharEdOptions", json)
        .type_attribute("ensemble.v1.CoLlmOptions", json)
        .type_attribute("ensemble.v1.PipelineOptions", json)
        .type_attribute("ensemble.v1.PipelineStage", json)
        .type_attribute("ensemble.v1.PipelineRoute", json)
        .compile_fds(fds)?;
    Ok(())
}
