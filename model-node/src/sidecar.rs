//! Files that ship beside a checkpoint and never inside it (Co-LLM deferral heads, RTD reference
//! stores): safetensors written byte for byte the same for the same content. Written by hand, not
//! with `safetensors::serialize`, whose metadata map is a `HashMap` that changes order from run to
//! run.

/// The safetensors bytes of `metadata` (string values) and little-endian `tensors` (name, dtype as
/// safetensors spells it, shape, data), the data in the order given.
pub fn safetensors_bytes(
    metadata: serde_json::Map<String, serde_json::Value>,
    tensors: &[(&str, &str, Vec<usize>, Vec<u8>)],
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    let mut offset = 0;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for (_, _, _, data) in tensors {
        bytes.extend_from_slice(data);
    }
    bytes
}
