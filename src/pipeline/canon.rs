//! The canonical JSON of a stage config: `serde_json::to_value`, except that no two
//! different configs share a value.
//!
//! `serde_json` turns NaN and ±inf into `null`, the value of an absent option, so a
//! gate of `-inf` would share its cache key with no gate at all. Here a non-finite
//! float becomes `{"$float": "NaN" | "inf" | "-inf"}`. To keep that unambiguous, every
//! map key that starts with `$` gets one more `$` in front; struct field names never
//! start with `$`, so configs with only finite floats give exactly what
//! `serde_json::to_value` gives (and keep their cache keys).

use serde::ser::{self, Serialize};
use serde_json::{Map, Number, Value};

/// The key of the object standing for a non-finite float.
pub const FLOAT_TAG: &str = "$float";

/// `config` as canonical JSON (see the module docs).
pub fn to_value<T: Serialize + ?Sized>(config: &T) -> Result<Value, Error> {
    config.serialize(Canon)
}

/// A map key as stored: a leading `$` is doubled.
pub fn escape_key(k: String) -> String {
    if k.starts_with('$') {
        format!("${k}")
    } else {
        k
    }
}

fn float(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None => {
            let text = if f.is_nan() {
                "NaN"
            } else if f > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            let mut m = Map::new();
            m.insert(FLOAT_TAG.into(), Value::String(text.into()));
            Value::Object(m)
        }
    }
}

#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

struct Canon;

pub struct SeqOut {
    items: Vec<Value>,
    variant: Option<&'static str>,
}

pub struct MapOut {
    map: Map<String, Value>,
    next_key: Option<String>,
    variant: Option<&'static str>,
}

fn wrap(variant: Option<&'static str>, v: Value) -> Value {
    match variant {
        Some(name) => {
            let mut m = Map::new();
            m.insert(escape_key(name.to_string()), v);
            Value::Object(m)
        }
        None => v,
    }
}

impl ser::Serializer for Canon {
    type Ok = Value;
    type Error = Error;
    type SerializeSeq = SeqOut;
    type SerializeTuple = SeqOut;
    type SerializeTupleStruct = SeqOut;
    type SerializeTupleVariant = SeqOut;
    type SerializeMap = MapOut;
    type SerializeStruct = MapOut;
    type SerializeStructVariant = MapOut;

    fn serialize_bool(self, v: bool) -> Result<Value, Error> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_i16(self, v: i16) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_i32(self, v: i32) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_i64(self, v: i64) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_u16(self, v: u16) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_u32(self, v: u32) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_u64(self, v: u64) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_f32(self, v: f32) -> Result<Value, Error> {
        Ok(float(f64::from(v)))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, Error> {
        Ok(float(v))
    }
    fn serialize_char(self, v: char) -> Result<Value, Error> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, Error> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, Error> {
        Ok(Value::Array(v.iter().map(|&b| Value::from(b)).collect()))
    }
    fn serialize_none(self) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<Value, Error> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value, Error> {
        Ok(Value::String(variant.to_string()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<Value, Error> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<Value, Error> {
        Ok(wrap(Some(variant), v.serialize(self)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqOut, Error> {
        Ok(SeqOut {
            items: Vec::with_capacity(len.unwrap_or(0)),
            variant: None,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqOut, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<SeqOut, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SeqOut, Error> {
        Ok(SeqOut {
            items: Vec::with_capacity(len),
            variant: Some(variant),
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<MapOut, Error> {
        Ok(MapOut {
            map: Map::new(),
            next_key: None,
            variant: None,
        })
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<MapOut, Error> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<MapOut, Error> {
        Ok(MapOut {
            map: Map::new(),
            next_key: None,
            variant: Some(variant),
        })
    }
}

impl SeqOut {
    fn push<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.items.push(v.serialize(Canon)?);
        Ok(())
    }
    fn done(self) -> Value {
        wrap(self.variant, Value::Array(self.items))
    }
}

impl ser::SerializeSeq for SeqOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.push(v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

impl ser::SerializeTuple for SeqOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.push(v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

impl ser::SerializeTupleStruct for SeqOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.push(v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

impl ser::SerializeTupleVariant for SeqOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.push(v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

/// A map key as text (JSON object keys are strings).
fn key_text(v: Value) -> Result<String, Error> {
    match v {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(Error(format!("a map key must be a string, not {other}"))),
    }
}

impl MapOut {
    fn field<T: Serialize + ?Sized>(&mut self, key: String, v: &T) -> Result<(), Error> {
        self.map.insert(escape_key(key), v.serialize(Canon)?);
        Ok(())
    }
    fn done(self) -> Value {
        wrap(self.variant, Value::Object(self.map))
    }
}

impl ser::SerializeMap for MapOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Error> {
        self.next_key = Some(key_text(k.serialize(Canon)?)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        let key = self
            .next_key
            .take()
            .ok_or_else(|| Error("a map value without a key".into()))?;
        self.field(key, v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

impl ser::SerializeStruct for MapOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        self.field(key.to_string(), v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

impl ser::SerializeStructVariant for MapOut {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        self.field(key.to_string(), v)
    }
    fn end(self) -> Result<Value, Error> {
        Ok(self.done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct C {
        a: Option<f64>,
        b: Vec<u32>,
        m: BTreeMap<String, f64>,
        e: E,
    }

    #[derive(Serialize)]
    enum E {
        #[serde(rename = "x")]
        X,
    }

    #[test]
    fn finite_configs_encode_as_serde_json_does() {
        let mut m = BTreeMap::new();
        m.insert("k".to_string(), 0.5);
        let c = C {
            a: Some(0.1),
            b: vec![1, 2],
            m,
            e: E::X,
        };
        assert_eq!(to_value(&c).unwrap(), serde_json::to_value(&c).unwrap());
        let none = C {
            a: None,
            b: vec![],
            m: BTreeMap::new(),
            e: E::X,
        };
        assert_eq!(
            to_value(&none).unwrap(),
            serde_json::to_value(&none).unwrap()
        );
    }

    #[test]
    fn non_finite_floats_and_dollar_keys_stay_distinct() {
        let v = |x: f64| to_value(&Some(x)).unwrap();
        let none = to_value(&Option::<f64>::None).unwrap();
        let all = [
            v(f64::NAN),
            v(f64::INFINITY),
            v(f64::NEG_INFINITY),
            none,
            v(1.0),
        ];
        for i in 0..all.len() {
            for j in 0..i {
                assert_ne!(all[i], all[j], "{i} vs {j}");
            }
        }
        assert_eq!(v(f64::NEG_INFINITY), json!({"$float": "-inf"}));
        // A map that spells the tag itself cannot pass for a float.
        let mut m = BTreeMap::new();
        m.insert("$float".to_string(), "NaN".to_string());
        assert_eq!(to_value(&m).unwrap(), json!({"$$float": "NaN"}));
        assert_ne!(to_value(&m).unwrap(), v(f64::NAN));
    }
}
