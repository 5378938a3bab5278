//! Objects saved by `torch.save` (a zip of `data.pkl` and raw tensor storages), unpickled by
//! candle's pickle reader and turned into plain values: ints, strings, lists, dicts and integer
//! tensors (the storage classes routing recorders use).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::{Object, Stack};

use crate::error::{Error, Result};

/// A plain value of an unpickled object tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A Python int or bool.
    Int(i64),
    /// A Python float.
    Float(f64),
    /// A Python str.
    Str(String),
    /// A list or tuple.
    List(Vec<Value>),
    /// A dict with string keys, in file order.
    Dict(Vec<(String, Value)>),
    /// An integer tensor: its shape and values (C order).
    Tensor(Vec<usize>, Vec<i64>),
    /// Anything else (a class instance the reader does not interpret), by its class name.
    Other(String),
}

impl Value {
    /// The value of key `k` of a dict.
    pub fn get(&self, k: &str) -> Option<&Value> {
        match self {
            Value::Dict(kv) => kv.iter().find(|(key, _)| key == k).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Tensor(..) => "tensor",
            Value::Other(_) => "object",
        }
    }
}

/// Reads a `torch.save` file into a [`Value`] tree.
pub fn load(path: &Path) -> Result<Value> {
    let bad = |m: String| Error::format(path, m);
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| {
        bad(format!(
            "not a PyTorch file saved by torch.save (zip archive expected): {e}"
        ))
    })?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("unreadable archive entry name: {e}")))?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("not a PyTorch file: no data.pkl in the archive".into()))?
        .clone();
    let dir = pkl.trim_end_matches("data.pkl").to_string();
    let mut bytes = Vec::new();
    zip.by_name(&pkl)
        .and_then(|mut m| m.read_to_end(&mut bytes).map_err(Into::into))
        .map_err(|e| bad(format!("{pkl}: {e}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(&bytes))
        .map_err(|e| bad(format!("{pkl}: corrupt or unsupported pickle: {e}")))?;
    let obj = stack
        .finalize()
        .map_err(|e| bad(format!("{pkl}: corrupt pickle: {e}")))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    convert(path, obj, &mut |key: &str| -> Result<Vec<u8>> {
        if let Some(b) = storages.get(key) {
            return Ok(b.clone());
        }
        let name = format!("{dir}data/{key}");
        let mut b = Vec::new();
        zip.by_name(&name)
            .and_then(|mut m| m.read_to_end(&mut b).map_err(Into::into))
            .map_err(|e| bad(format!("tensor storage {name}: {e}")))?;
        storages.insert(key.to_string(), b.clone());
        Ok(b)
    })
}

fn class_name(o: &Object) -> Option<(String, String)> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name.clone(), class_name.clone())),
        _ => None,
    }
}

fn int(o: &Object) -> Option<i64> {
    match o {
        Object::Int(i) => Some(*i as i64),
        Object::Long(i) => Some(*i),
        _ => None,
    }
}

fn ints(o: &Object) -> Option<Vec<i64>> {
    match o {
        Object::Tuple(v) | Object::List(v) => v.iter().map(int).collect(),
        _ => None,
    }
}

/// Decodes one element of a storage.
type Decode = fn(&[u8]) -> i64;

/// Element width and decoder of a typed storage class (`torch.IntStorage`, …).
fn storage_kind(class: &str) -> Option<(usize, Decode)> {
    Some(match class {
        "LongStorage" => (8, |b| i64::from_le_bytes(b.try_into().expect("8 bytes"))),
        "IntStorage" => (4, |b| {
            i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64
        }),
        "ShortStorage" => (2, |b| {
            i16::from_le_bytes(b.try_into().expect("2 bytes")) as i64
        }),
        "ByteStorage" => (1, |b| b[0] as i64),
        "CharStorage" => (1, |b| b[0] as i8 as i64),
        "BoolStorage" => (1, |b| (b[0] != 0) as i64),
        _ => return None,
    })
}

fn tensor(
    path: &Path,
    args: &Object,
    storage: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
) -> Result<Value> {
    let bad = |m: &str| Error::format(path, format!("tensor in the pickle: {m}"));
    let Object::Tuple(a) = args else {
        return Err(bad("rebuild arguments are not a tuple"));
    };
    let (Some(Object::PersistentLoad(pid)), Some(offset), Some(size), Some(stride)) = (
        a.first(),
        a.get(1).and_then(int),
        a.get(2).and_then(ints),
        a.get(3).and_then(ints),
    ) else {
        return Err(bad("unexpected rebuild arguments"));
    };
    let Object::Tuple(p) = pid.as_ref() else {
        return Err(bad("storage reference is not a tuple"));
    };
    let class = p
        .get(1)
        .and_then(class_name)
        .map(|c| c.1)
        .ok_or_else(|| bad("storage reference without a storage class"))?;
    let key = match p.get(2) {
        Some(Object::Unicode(k)) => k.clone(),
        _ => return Err(bad("storage reference without a key")),
    };
    let (width, decode) = storage_kind(&class).ok_or_else(|| {
        bad(&format!(
            "{class} tensors are not read (routing is stored as integer tensors)"
        ))
    })?;
    let raw = storage(&key)?;
    let shape: Vec<usize> = size.iter().map(|&d| d.max(0) as usize).collect();
    let n: usize = shape.iter().product();
    let mut values = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let at = offset
            + idx
                .iter()
                .zip(&stride)
                .map(|(&i, &s)| i as i64 * s)
                .sum::<i64>();
        let at = usize::try_from(at).map_err(|_| bad("negative storage offset"))? * width;
        let b = raw
            .get(at..at + width)
            .ok_or_else(|| bad(&format!("storage {key} is truncated")))?;
        values.push(decode(b));
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Value::Tensor(shape, values))
}

fn convert(
    path: &Path,
    o: Object,
    storage: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
) -> Result<Value> {
    Ok(match o {
        Object::None => Value::None,
        Object::Int(i) => Value::Int(i as i64),
        Object::Long(i) => Value::Int(i),
        Object::Bool(b) => Value::Int(b as i64),
        Object::Float(f) => Value::Float(f),
        Object::Unicode(s) => Value::Str(s),
        Object::List(v) | Object::Tuple(v) => Value::List(
            v.into_iter()
                .map(|x| convert(path, x, storage))
                .collect::<Result<_>>()?,
        ),
        Object::Dict(kv) => Value::Dict(
            kv.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Object::Unicode(s) => s,
                        other => format!("{other:?}"),
                    };
                    Ok((key, convert(path, v, storage)?))
                })
                .collect::<Result<_>>()?,
        ),
        Object::Reduce { callable, args } => match class_name(&callable) {
            Some((m, c)) if m == "torch._utils" && c == "_rebuild_tensor_v2" => {
                tensor(path, &args, storage)?
            }
            Some((m, c)) if m == "collections" && c == "OrderedDict" => Value::Dict(Vec::new()),
            Some((m, c)) => Value::Other(format!("{m}.{c}")),
            None => Value::Other("reduce".into()),
        },
        Object::Build { callable, args } => match (*callable, *args) {
            // An OrderedDict's items arrive as the state of its BUILD.
            (Object::Reduce { callable, .. }, Object::Dict(kv))
                if class_name(&callable)
                    .is_some_and(|(m, c)| m == "collections" && c == "OrderedDict") =>
            {
                convert(path, Object::Dict(kv), storage)?
            }
            (inner, _) => convert(path, inner, storage)?,
        },
        Object::Class {
            module_name,
            class_name,
        } => Value::Other(format!("{module_name}.{class_name}")),
        Object::PersistentLoad(_) | Object::Mark => Value::Other("storage".into()),
    })
}
