//! Fuzzing the layer spec reader (`LayerSpec::from_json`, what `mole eval --spec` reads): valid
//! specs of every preset, mutated (typos, unknown fields, removed fields, values of any JSON
//! type and size, other document forms) and arbitrary text. Each case must give a valid spec
//! or a typed error that names the field; nothing may panic or allocate beyond the bound.

mod fuzz;

use mole::model::LayerSpec;
use mole::MoleError;
use proptest::prelude::*;
use serde_json::Value;

#[global_allocator]
static ALLOC: fuzz::Bounded = fuzz::Bounded;

/// Every object key of a document: the path of its object, and the key.
fn keys(v: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    if let Value::Object(map) = v {
        for (k, child) in map {
            out.push((path.clone(), k.clone()));
            path.push(k.clone());
            keys(child, path, out);
            path.pop();
        }
    }
}

fn object_at<'a>(doc: &'a mut Value, path: &[String]) -> &'a mut serde_json::Map<String, Value> {
    let mut v = doc;
    for k in path {
        v = &mut v[k.as_str()];
    }
    v.as_object_mut().expect("paths come from objects")
}

fn dotted(path: &[String], key: &str) -> String {
    path.iter().map(String::as_str).chain([key]).collect::<Vec<_>>().join(".")
}

fn junk() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0u64, 1, 2, 7, 1 << 16, 1 << 20, 1 << 31, 1 << 32, 1 << 62, u64::MAX])
            .prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
        prop::collection::vec(0u64..40, 0..5).prop_map(Value::from),
        Just(serde_json::json!({})),
    ]
}

/// A valid spec's error-free round trip, or an error that reads like the spec, not like serde.
fn check_outcome(text: &str, result: &Result<LayerSpec, MoleError>) {
    match result {
        Ok(spec) => {
            spec.validate().unwrap();
            let again = LayerSpec::from_json(&serde_json::to_string(spec).unwrap()).unwrap();
            assert_eq!(&again, spec, "{text}");
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.is_empty() && !m.contains("untagged") && !m.contains("Repr"), "{m}");
        }
    }
}

proptest! {
    #![proptest_config(fuzz::config(512))]

    #[test]
    fn mutated_specs_give_a_spec_or_a_named_error(
        spec in fuzz::small_spec(),
        mutation in 0usize..6,
        at in any::<prop::sample::Index>(),
        value in junk(),
    ) {
        let mut doc = serde_json::to_value(&spec).unwrap();
        let mut all = Vec::new();
        keys(&doc, &mut Vec::new(), &mut all);
        let (path, key) = at.get(&all).clone();
        // The path the error must name, where the mutation makes the spec wrong for certain.
        let mut expect_path = None;
        match mutation {
            0 if key == "type" => {
                let tag = object_at(&mut doc, &path)["type"].as_str().unwrap().to_string();
                object_at(&mut doc, &path).insert(key.clone(), Value::from(format!("{tag}x")));
                expect_path = Some(dotted(&path, "type"));
            }
            0 => {
                let obj = object_at(&mut doc, &path);
                let v = obj.remove(&key).unwrap();
                obj.insert(format!("{key}x"), v);
                expect_path = Some(dotted(&path, &format!("{key}x")));
            }
            1 => {
                object_at(&mut doc, &path).insert("zz_unknown".into(), value.clone());
                expect_path = Some(dotted(&path, "zz_unknown"));
            }
            2 => {
                object_at(&mut doc, &path).remove(&key);
            }
            3 => {
                object_at(&mut doc, &path).insert(key.clone(), value.clone());
            }
            4 => doc = Value::Array(vec![doc]),
            _ => {
                // The positional form serde would accept for a struct.
                let Value::Object(map) = doc else { unreachable!() };
                doc = Value::Array(map.into_iter().map(|(_, v)| v).collect());
                expect_path = Some(String::new());
            }
        }
        let text = serde_json::to_string(&doc).unwrap();
        let result = LayerSpec::from_json(&text);
        check_outcome(&text, &result);
        if mutation == 4 {
            expect_path = Some(String::new());
        }
        if let Some(want) = expect_path {
            match &result {
                Err(MoleError::InvalidSpec { path, .. }) => prop_assert_eq!(path, &want, "{}", text),
                other => prop_assert!(false, "{text}: expected an error at `{want}`, got {other:?}"),
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}", prefix in prop::sample::select(vec!["", "{", "{\"d_in\":", "[", "{\"ranks\": {\"experts\": "])) {
        let text = format!("{prefix}{text}");
        let result = LayerSpec::from_json(&text);
        check_outcome(&text, &result);
    }
}
