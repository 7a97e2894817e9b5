//! Reading a [`LayerSpec`] (or an [`FfnSpec`]) from JSON strictly: only the documented object form, every field
//! known at every level. Errors name the field by its path (`gating.rule.temprature`) and the
//! closest valid name, never a serde type.
//!
//! The document is checked against the schema below, then deserialized by serde (whose types
//! also deny unknown fields) and validated. A test checks that every form serde writes passes
//! the schema, so the two cannot drift apart unnoticed.

use super::{FfnSpec, LayerSpec};
use crate::{MoleError, Result};
use serde_json::Value;

/// The JSON type a field takes.
enum Kind {
    /// A non-negative integer.
    Count,
    /// Optional count: a non-negative integer or `null`.
    OptCount,
    /// Any JSON number.
    Number,
    /// An array of JSON numbers.
    Numbers,
    /// `true` or `false`.
    Bool,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// An array of these strings.
    ListOf(&'static [&'static str]),
    /// An object with a `type` tag choosing among variants, each with its fields.
    Tagged(&'static [Variant]),
    /// The bank layout: offsets `[0, ...]` or `{"experts": E, "rank": r}`.
    Ranks,
    /// An object with these fields, or `null` (absent).
    OptObject(&'static [Field]),
}

struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
}

/// One variant of a tagged object: its `type` and its fields.
type Variant = (&'static str, &'static [Field]);

const fn req(name: &'static str, kind: Kind) -> Field {
    Field { name, kind, required: true }
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field { name, kind, required: false }
}

const ROUTERS: &[Variant] =
    &[("x", &[opt("bias", Kind::Bool)]), ("h", &[opt("bias", Kind::Bool)]), ("low_rank", &[]), ("logits", &[])];

const RULES: &[Variant] = &[
    (
        "softmax_topk",
        &[
            req("k", Kind::Count),
            opt("temperature", Kind::Number),
            opt("weights", Kind::OneOf(&["softmax", "renormalized", "unit"])),
        ],
    ),
    ("top_p", &[req("p", Kind::Number), opt("temperature", Kind::Number)]),
    (
        "dynmole",
        &[
            req("q", Kind::Number),
            req("top_p", Kind::Number),
            req("keep_top_k", Kind::Count),
            req("entropy_threshold", Kind::Number),
            opt("entropy_eps", Kind::Number),
        ],
    ),
    ("dense_softmax", &[opt("temperature", Kind::Number)]),
    ("sigmoid_topk", &[req("k", Kind::Count), opt("bias", Kind::Bool)]),
    (
        "magnitude_topk",
        &[req("k", Kind::Count), opt("bias", Kind::Bool), opt("selection", Kind::OneOf(&["magnitude", "signed"]))],
    ),
];

const GATINGS: &[Variant] = &[
    ("routed", &[req("router", Kind::Tagged(ROUTERS)), req("rule", Kind::Tagged(RULES))]),
    ("given", &[opt("top_k", Kind::OptCount), opt("softmax_topk", Kind::Bool)]),
    ("adapter_ids", &[]),
];

const MIXES: &[Variant] = &[("expert_scale", &[]), ("core_merge", &[req("cores", Kind::Count)])];

const LAYER: &[Field] = &[
    req("d_in", Kind::Count),
    req("d_out", Kind::Count),
    req("ranks", Kind::Ranks),
    req("scale", Kind::Number),
    req("gating", Kind::Tagged(GATINGS)),
    opt("mix", Kind::Tagged(MIXES)),
    opt("expert_scales", Kind::Numbers),
    opt("training", Kind::OptObject(TRAINING)),
];

const AUX_LOSSES: &[Field] = &[
    opt("load_balancing", Kind::Number),
    opt("balance", Kind::OneOf(&["switch", "dynmole", "llava_mole"])),
    opt("z_loss", Kind::Number),
    opt("entropy", Kind::Number),
];

const TRAINING: &[Field] =
    &[opt("frozen", Kind::ListOf(&["a", "b", "router", "cores"])), opt("aux_losses", Kind::OptObject(AUX_LOSSES))];

const PROJECTION_LORA: &[Field] = &[req("ranks", Kind::Ranks), req("scale", Kind::Number)];

const FFN: &[Field] = &[
    req("d", Kind::Count),
    req("f", Kind::Count),
    opt("activation", Kind::OneOf(&["silu", "gelu"])),
    req("gating", Kind::Tagged(GATINGS)),
    req("experts", Kind::Count),
    opt("gate", Kind::OptObject(PROJECTION_LORA)),
    opt("up", Kind::OptObject(PROJECTION_LORA)),
    opt("down", Kind::OptObject(PROJECTION_LORA)),
];

const UNIFORM_RANKS: &[Field] = &[req("experts", Kind::Count), req("rank", Kind::Count)];

fn err(path: &str, message: impl Into<String>) -> MoleError {
    MoleError::InvalidSpec { path: path.to_string(), message: message.into() }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// Edit distance (insertions, deletions, substitutions) between two short names.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// "`x` (did you mean `y`?); expected one of a, b, c" for an unknown name among `valid`.
fn unknown(what: &str, got: &str, valid: &[&str]) -> String {
    let list = valid.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ");
    let closest = valid.iter().map(|v| (distance(got, v), v)).min();
    match closest {
        Some((d, v)) if d <= 2.max(got.chars().count() / 3) => {
            format!("unknown {what} `{got}` (did you mean `{v}`?); expected one of {list}")
        }
        _ if valid.is_empty() => format!("unknown {what} `{got}`; this object takes no fields"),
        _ => format!("unknown {what} `{got}`; expected one of {list}"),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_count(path: &str, v: &Value) -> Result<()> {
    match v.as_u64() {
        Some(n) if usize::try_from(n).is_ok() => Ok(()),
        _ => Err(err(path, format!("expected a non-negative integer, got {}", describe(v)))),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("the string {s:?}"),
        other => type_name(other).to_string(),
    }
}

fn check_value(path: &str, kind: &Kind, v: &Value) -> Result<()> {
    match kind {
        Kind::Count => check_count(path, v),
        Kind::OptCount if v.is_null() => Ok(()),
        Kind::OptCount => check_count(path, v),
        Kind::Number if v.is_number() => Ok(()),
        Kind::Number => Err(err(path, format!("expected a number, got {}", describe(v)))),
        Kind::Numbers => match v {
            Value::Array(items) => items.iter().enumerate().try_for_each(|(i, item)| match item {
                Value::Number(_) => Ok(()),
                other => Err(err(&format!("{path}[{i}]"), format!("expected a number, got {}", describe(other)))),
            }),
            other => Err(err(path, format!("expected an array of numbers, got {}", type_name(other)))),
        },
        Kind::Bool if v.is_boolean() => Ok(()),
        Kind::Bool => Err(err(path, format!("expected true or false, got {}", describe(v)))),
        Kind::OneOf(values) => match v.as_str() {
            Some(s) if values.contains(&s) => Ok(()),
            Some(s) => Err(err(path, unknown("value", s, values))),
            None => Err(err(path, format!("expected a string, got {}", describe(v)))),
        },
        Kind::ListOf(values) => match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| check_value(&format!("{path}[{i}]"), &Kind::OneOf(values), item)),
            other => Err(err(path, format!("expected an array of strings, got {}", type_name(other)))),
        },
        Kind::Tagged(variants) => check_tagged(path, variants, v),
        Kind::OptObject(_) if v.is_null() => Ok(()),
        Kind::OptObject(fields) => check_object(path, fields, v, None),
        Kind::Ranks => match v {
            Value::Array(items) => {
                items.iter().enumerate().try_for_each(|(i, item)| check_count(&format!("{path}[{i}]"), item))
            }
            Value::Object(_) => check_object(path, UNIFORM_RANKS, v, None),
            other => Err(err(
                path,
                format!(
                    "expected rank offsets [0, r0, r0 + r1, ...] or {{\"experts\": E, \"rank\": r}}, got {}",
                    type_name(other)
                ),
            )),
        },
    }
}

fn check_tagged(path: &str, variants: &[Variant], v: &Value) -> Result<()> {
    let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
    let Value::Object(map) = v else {
        return Err(err(path, format!("expected an object with a \"type\" field, got {}", type_name(v))));
    };
    let tag_path = join(path, "type");
    let tag = match map.get("type") {
        None => return Err(err(&tag_path, format!("missing; expected one of {}", names.join(", ")))),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(err(&tag_path, format!("expected a string, got {}", describe(other)))),
    };
    let Some((_, fields)) = variants.iter().find(|(n, _)| *n == tag) else {
        return Err(err(&tag_path, unknown("type", tag, &names)));
    };
    check_object(path, fields, v, Some("type"))
}

fn check_object(path: &str, fields: &[Field], v: &Value, tag: Option<&str>) -> Result<()> {
    let Value::Object(map) = v else {
        return Err(err(path, format!("expected an object, got {}", type_name(v))));
    };
    for (key, value) in map {
        if Some(key.as_str()) == tag {
            continue;
        }
        match fields.iter().find(|f| f.name == key) {
            Some(f) => check_value(&join(path, key), &f.kind, value)?,
            None => {
                let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
                return Err(err(&join(path, key), unknown("field", key, &names)));
            }
        }
    }
    match fields.iter().find(|f| f.required && !map.contains_key(f.name)) {
        Some(f) => Err(err(&join(path, f.name), "missing")),
        None => Ok(()),
    }
}

impl LayerSpec {
    /// Parses and validates a layer spec written as JSON (the `mole eval --spec` file). Only the
    /// documented object form is accepted; an unknown field at any level, a missing one or a
    /// value of the wrong type is [`MoleError::InvalidSpec`] with the field's path.
    pub fn from_json(text: &str) -> Result<LayerSpec> {
        let doc: Value = serde_json::from_str(text).map_err(|e| err("", format!("not valid JSON: {e}")))?;
        check_object("", LAYER, &doc, None)?;
        let spec: LayerSpec = serde_json::from_value(doc).map_err(|e| err("", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }
}

impl FfnSpec {
    /// Parses and validates an FFN-expert block written as JSON (a `mole eval --spec` file with
    /// the field `"f"`). As [`LayerSpec::from_json`]: only the documented object form, errors
    /// ([`MoleError::InvalidSpec`]) naming the field's path.
    pub fn from_json(text: &str) -> Result<FfnSpec> {
        let doc: Value = serde_json::from_str(text).map_err(|e| err("", format!("not valid JSON: {e}")))?;
        check_object("", FFN, &doc, None)?;
        let spec: FfnSpec = serde_json::from_value(doc).map_err(|e| err("", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};

    const MIXLORA: &str = r#"{"d_in": 64, "d_out": 32, "ranks": {"experts": 8, "rank": 4}, "scale": 2.0,
        "gating": {"type": "routed", "router": {"type": "x", "bias": false},
                   "rule": {"type": "softmax_topk", "k": 2, "temperature": 0.5, "weights": "renormalized"}},
        "mix": {"type": "expert_scale"}}"#;

    fn message(text: &str) -> String {
        LayerSpec::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn every_form_serde_writes_passes_the_schema() {
        for m in Method::ALL {
            let rank = if m.single_rank_experts() { 1 } else { 4 };
            let spec = m.spec(MethodShape { d_in: 16, d_out: 8, experts: 4, rank, k: 2, alpha: 8.0 }).unwrap();
            let text = serde_json::to_string(&spec).unwrap();
            assert_eq!(LayerSpec::from_json(&text).unwrap_or_else(|e| panic!("{m}: {e}\n{text}")), spec);
        }
        let mut spec = LayerSpec::from_json(MIXLORA).unwrap();
        spec.ranks = crate::model::RankLayout::from_offsets(vec![0, 2, 5, 5, 9]).unwrap();
        spec.gating = crate::model::Gating::Given { top_k: Some(2), softmax_topk: true };
        assert_eq!(LayerSpec::from_json(&serde_json::to_string(&spec).unwrap()).unwrap(), spec);
        spec.expert_scales = Some(vec![0.5, -2.0, 0.0, 1.25]);
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains("\"expert_scales\":[0.5,-2.0,0.0,1.25]"), "{text}");
        assert_eq!(LayerSpec::from_json(&text).unwrap(), spec);
    }

    #[test]
    fn expert_scales_are_an_array_of_numbers_one_per_bank_expert() {
        let with =
            |scales: &str| MIXLORA.replace("\"scale\": 2.0,", &format!("\"scale\": 2.0, \"expert_scales\": {scales},"));
        let spec = LayerSpec::from_json(&with("[1, 0.5, 0, -1, 2, 1, 1, 3]")).unwrap();
        assert_eq!(spec.expert_scales, Some(vec![1.0, 0.5, 0.0, -1.0, 2.0, 1.0, 1.0, 3.0]));
        let m = message(&with("[1, 0.5, \"x\", -1, 2, 1, 1, 3]"));
        assert!(m.contains("expert_scales[2]: expected a number, got the string \"x\""), "{m}");
        assert!(message(&with("2.0")).contains("expert_scales: expected an array of numbers, got a number"));
        let m = message(&with("[1, 2]"));
        assert!(m.contains("expert_scales (one per bank expert): expected shape [8]"), "{m}");
        let m = message(&MIXLORA.replace("\"scale\": 2.0,", "\"scale\": 2.0, \"expert_scale\": [1],"));
        assert!(m.contains("unknown field `expert_scale` (did you mean `expert_scales`?)"), "{m}");
    }

    #[test]
    fn unknown_fields_name_their_path_and_the_closest_name() {
        let typo = MIXLORA.replace("\"temperature\"", "\"temprature\"");
        let m = message(&typo);
        assert!(
            m.starts_with(
                "layer spec: gating.rule.temprature: unknown field `temprature` (did you mean `temperature`?)"
            ),
            "{m}"
        );
        let m = message(&MIXLORA.replace("\"bias\": false", "\"bias\": false, \"extra\": 1"));
        assert!(m.contains("gating.router.extra: unknown field"), "{m}");
        let m = message(&MIXLORA.replace("\"type\": \"expert_scale\"", "\"type\": \"expert_scale\", \"cores\": 2"));
        assert!(m.contains("mix.cores: unknown field `cores`; this object takes no fields"), "{m}");
        let m = message(&MIXLORA.replace("\"rank\": 4", "\"rank\": 4, \"ranks\": 3"));
        assert!(m.contains("ranks.ranks: unknown field `ranks` (did you mean `rank`?)"), "{m}");
        let m = message(&MIXLORA.replace("softmax_topk", "softmax_top_k"));
        assert!(m.contains("gating.rule.type: unknown type `softmax_top_k` (did you mean `softmax_topk`?)"), "{m}");
        let m = message(&MIXLORA.replace("\"d_out\"", "\"dout\""));
        assert!(m.contains("dout: unknown field `dout` (did you mean `d_out`?)"), "{m}");
    }

    #[test]
    fn only_the_documented_object_form_parses() {
        assert!(
            message(r#"[64, 32, [0, 4], 1.0, {"type": "adapter_ids"}]"#).contains("expected an object, got an array")
        );
        assert!(message(&MIXLORA.replace("\"k\": 2", "\"k\": -1"))
            .contains("gating.rule.k: expected a non-negative integer, got -1"));
        assert!(message(&MIXLORA.replace("\"k\": 2", "\"k\": 2.5"))
            .contains("gating.rule.k: expected a non-negative integer"));
        assert!(message(&MIXLORA.replace("\"scale\": 2.0", "\"scale\": \"2\"")).contains("scale: expected a number"));
        assert!(message(&MIXLORA.replace("{\"experts\": 8, \"rank\": 4}", "\"8x4\""))
            .contains("ranks: expected rank offsets"));
        assert!(message(&MIXLORA.replace("{\"experts\": 8, \"rank\": 4}", "[0, 4, -8]"))
            .contains("ranks[2]: expected a non-negative integer"));
        assert!(message(&MIXLORA.replace("\"k\": 2, ", "")).contains("gating.rule.k: missing"));
        assert!(message("{").contains("not valid JSON"));
        // Valid JSON, valid form, invalid layer: the validation error.
        assert!(message(&MIXLORA.replace("\"k\": 2", "\"k\": 9")).contains("k = 9 is invalid for 8 experts"));
    }

    #[test]
    fn huge_sizes_are_refused_before_any_allocation() {
        let m = message(&MIXLORA.replace("\"experts\": 8", "\"experts\": 4611686018427387904"));
        assert!(m.contains("experts = 4611686018427387904 is too large: at most 65536"), "{m}");
        let m =
            message(&MIXLORA.replace("\"experts\": 8, \"rank\": 4", "\"experts\": 65536, \"rank\": 281474976710656"));
        assert!(m.contains("total rank (experts x rank) = 65536 x 281474976710656 is too large"), "{m}");
        assert!(message(&MIXLORA.replace("\"d_in\": 64", "\"d_in\": 1099511627776"))
            .contains("d_in = 1099511627776 is too large"));
    }

    #[test]
    fn ffn_blocks_parse_strictly() {
        use crate::model::{Activation, FfnMethod, FfnShape};
        for m in FfnMethod::ALL {
            let shape = FfnShape { d: 16, f: 24, experts: 4, rank: 2, k: 2, alpha: 4.0, activation: Activation::Gelu };
            let mut spec = m.spec(shape).unwrap();
            let text = serde_json::to_string(&spec).unwrap();
            assert_eq!(FfnSpec::from_json(&text).unwrap_or_else(|e| panic!("{m}: {e}\n{text}")), spec);
            spec.up = None;
            let text = serde_json::to_string(&spec).unwrap();
            assert_eq!(FfnSpec::from_json(&text).unwrap(), spec);
        }
        let text = r#"{"d": 8, "f": 16, "experts": 2, "gating": {"type": "adapter_ids"},
                       "gate": {"ranks": {"experts": 2, "rank": 2}, "scael": 1.0}}"#;
        let m = FfnSpec::from_json(text).unwrap_err().to_string();
        assert!(m.contains("gate.scael") && m.contains("did you mean `scale`"), "{m}");
        let m = FfnSpec::from_json(&text.replace(r#""scael": 1.0"#, r#""scale": 1.0"#).replace("16", "-1"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("f: expected a non-negative integer, got -1"), "{m}");
        let m = FfnSpec::from_json(
            r#"{"d": 8, "f": 16, "experts": 2, "activation": "relu", "gating": {"type": "adapter_ids"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(m.contains("activation") && m.contains("relu"), "{m}");
    }
}
