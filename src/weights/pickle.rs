//! A small pickle virtual machine for what `torch.save` writes (spec §5.2: PyTorch >= 1.6 zip +
//! pickle, protocol 2 by default). It builds plain values, recognises `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` and the persistent id
//! `('storage', torch.XStorage, key, location, numel)`, and keeps every other object opaque so a
//! training checkpoint's optimizer and scheduler state do not stop the load. No code is run.

use super::SourceDType;
use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

/// A persistent storage reference: the zip entry `data/<key>` holds its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Storage {
    pub dtype: SourceDType,
    pub key: String,
    /// Elements in the storage, as declared in the pickle.
    pub numel: usize,
}

/// A tensor view of a storage as `_rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: Rc<Storage>,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Number of elements; None if the shape overflows (a damaged file).
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Row-major contiguous (dimensions of size 1 may carry any stride, as in PyTorch).
    pub fn is_contiguous(&self) -> bool {
        if self.shape.len() != self.stride.len() {
            return false;
        }
        let mut expected = 1usize;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
        true
    }
}

/// A container's items and its nesting depth. The depth is bounded ([`MAX_DEPTH`]) so that a
/// hostile pickle cannot build values deep enough to exhaust the stack when they are dropped.
#[derive(Debug)]
pub struct Items<T> {
    pub items: Vec<T>,
    pub depth: usize,
}

impl<T> Default for Items<T> {
    /// An empty container: depth 1.
    fn default() -> Self {
        Items {
            items: Vec::new(),
            depth: 1,
        }
    }
}

/// A mutable, shared dict (pickle memo entries alias the object on the stack).
pub type Dict = Rc<RefCell<Items<(Value, Value)>>>;

/// Deepest container nesting accepted (state dicts need 4 or 5 levels).
pub const MAX_DEPTH: usize = 100;

/// What the VM builds.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Strings and bytes are shared, not copied, by DUP and the memo (a few bytes of pickle
    /// must not demand a copy of a large string each).
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Items<Value>>),
    List(Rc<RefCell<Items<Value>>>),
    Dict(Dict),
    /// `module.name` from GLOBAL / STACK_GLOBAL.
    Global(String, String),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorRef>),
    /// Anything else (an unknown class called with arguments, an integer wider than 64 bits):
    /// kept by name only.
    Opaque(String),
}

impl Value {
    /// Container nesting depth (0 for scalars).
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(t) => t.depth,
            // A container being filled with itself is already borrowed: count it as too deep.
            Value::List(l) => l.try_borrow().map_or(MAX_DEPTH, |l| l.depth),
            Value::Dict(d) => d.try_borrow().map_or(MAX_DEPTH, |d| d.depth),
            Value::Tensor(_) => 1,
            _ => 0,
        }
    }

    /// A short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(m, n) => format!("the class {m}.{n}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Opaque(name) => format!("an object ({name})"),
        }
    }
}

/// A pickle that this reader cannot follow; `pos` is the byte offset of the opcode.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    pub pos: usize,
    pub msg: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle byte {}: {}", self.pos, self.msg)
    }
}

/// Stack items: values or MARK.
enum Item {
    Mark,
    V(Value),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Position of the opcode being run (for errors).
    op_pos: usize,
    stack: Vec<Item>,
    memo: std::collections::HashMap<u32, Value>,
    /// Values pushed so far (bounded by [`MAX_OBJECTS`]).
    objects: usize,
}

/// Guards against hostile inputs: the stack cannot exceed this many items.
const MAX_STACK: usize = 1 << 22;

/// At most this many values pushed in one pickle (a state dict of the released model pushes
/// about 10,000; a training checkpoint with optimizer state about 100,000).
pub const MAX_OBJECTS: usize = 10_000_000;

/// At most this many memo entries (PUT / MEMOIZE).
pub const MAX_MEMO: usize = 1_000_000;

/// Runs the pickle in `data` and returns the value left by STOP.
pub fn load(data: &[u8]) -> Result<Value, PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        op_pos: 0,
        stack: Vec::new(),
        memo: Default::default(),
        objects: 0,
    };
    vm.run()
}

impl<'a> Vm<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            pos: self.op_pos,
            msg: msg.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => self.err("unexpected end of data (truncated pickle)"),
        }
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A newline-terminated line (text opcodes), without the newline.
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("unterminated text argument (truncated pickle)");
        };
        let s = std::str::from_utf8(&rest[..n]);
        self.pos += n + 1;
        match s {
            Ok(s) => Ok(s),
            Err(_) => self.err("text argument is not UTF-8"),
        }
    }

    fn len_prefixed(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let n = usize::try_from(n).or_else(|_| self.err("length does not fit in memory"))?;
        self.take(n)
    }

    fn utf8(&self, b: &[u8]) -> Result<Rc<str>, PickleError> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Rc::from(s)),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return self.err("pickle stack too deep");
        }
        self.objects += 1;
        if self.objects > MAX_OBJECTS {
            return self.err(format!("more than {MAX_OBJECTS} objects (limit)"));
        }
        self.stack.push(Item::V(v));
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => self.err("expected a value, found MARK"),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err(PickleError {
                pos: self.op_pos,
                msg: "expected a value on the stack".into(),
            }),
        }
    }

    /// Pops everything down to the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(m) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            return self.err("MARK not found");
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::V(v) => v,
                Item::Mark => unreachable!("rposition found the last mark"),
            })
            .collect())
    }

    fn memo_get(&self, idx: u32) -> Result<Value, PickleError> {
        match self.memo.get(&idx) {
            Some(v) => Ok(v.clone()),
            None => self.err(format!("memo entry {idx} used before it was set")),
        }
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return self.err(format!("more than {MAX_MEMO} memo entries (limit)"));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn set_items(&mut self, pairs: Vec<Value>) -> Result<(), PickleError> {
        if !pairs.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of items");
        }
        let target = self.top()?.clone();
        match target {
            Value::Dict(d) => {
                let depth = self.depth_over(&pairs)?;
                let Ok(mut d) = d.try_borrow_mut() else {
                    return self.err("dict modified while in use");
                };
                d.depth = d.depth.max(depth);
                let mut it = pairs.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.items.push((k, v));
                }
                Ok(())
            }
            // Dict-like objects of unknown classes: their items do not matter here.
            Value::Opaque(_) => Ok(()),
            other => self.err(format!("SETITEM(S) on {}", other.kind())),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let target = self.top()?.clone();
        match target {
            Value::List(l) => {
                let depth = self.depth_over(&items)?;
                let Ok(mut l) = l.try_borrow_mut() else {
                    return self.err("list modified while in use");
                };
                l.depth = l.depth.max(depth);
                l.items.extend(items);
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => self.err(format!("APPEND(S) on {}", other.kind())),
        }
    }

    /// The depth of a container holding `items`, refused beyond [`MAX_DEPTH`].
    fn depth_over(&self, items: &[Value]) -> Result<usize, PickleError> {
        let d = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if d > MAX_DEPTH {
            return self.err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        Ok(d)
    }

    fn tuple(&self, items: Vec<Value>) -> Result<Value, PickleError> {
        let depth = self.depth_over(&items)?;
        Ok(Value::Tuple(Rc::new(Items { items, depth })))
    }

    fn int_arg(&self, v: &Value, what: &str) -> Result<usize, PickleError> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            Value::Bool(b) => Ok(*b as usize),
            other => self.err(format!(
                "{what}: expected a non-negative int, found {}",
                other.kind()
            )),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<usize>, PickleError> {
        match v {
            Value::Tuple(t) => t.items.iter().map(|x| self.int_arg(x, what)).collect(),
            Value::List(l) => match l.try_borrow() {
                Ok(l) => l.items.iter().map(|x| self.int_arg(x, what)).collect(),
                Err(_) => self.err(format!("{what}: list in use")),
            },
            other => self.err(format!("{what}: expected a tuple, found {}", other.kind())),
        }
    }

    /// `('storage', torch.FloatStorage, key, location, numel)` (BINPERSID).
    fn persistent_load(&self, pid: Value) -> Result<Value, PickleError> {
        let Value::Tuple(t) = &pid else {
            return self.err(format!("persistent id is {}, expected a tuple", pid.kind()));
        };
        let t = &t.items;
        match t.first() {
            Some(Value::Str(s)) if &**s == "storage" => {}
            _ => return self.err("persistent id is not a ('storage', ...) tuple"),
        }
        if t.len() < 5 {
            return self.err("persistent storage id has fewer than 5 fields");
        }
        let dtype = match &t[1] {
            Value::Global(_, name) => SourceDType::from_torch_storage(name),
            other => return self.err(format!("storage type is {}", other.kind())),
        };
        let key = match &t[2] {
            Value::Str(s) => s.to_string(),
            other => return self.err(format!("storage key is {}", other.kind())),
        };
        let numel = self.int_arg(&t[4], "storage size")?;
        Ok(Value::Storage(Rc::new(Storage { dtype, key, numel })))
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
    /// and the older `_rebuild_tensor(storage, offset, size, stride)`.
    fn rebuild_tensor(&self, args: &[Value]) -> Result<Value, PickleError> {
        if args.len() < 4 {
            return self.err("_rebuild_tensor with fewer than 4 arguments");
        }
        let storage = match &args[0] {
            Value::Storage(s) => s.clone(),
            other => return self.err(format!("tensor storage is {}", other.kind())),
        };
        let offset = self.int_arg(&args[1], "storage offset")?;
        let shape = self.int_tuple(&args[2], "tensor size")?;
        let stride = self.int_tuple(&args[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return self.err("tensor size and stride have different lengths");
        }
        Ok(Value::Tensor(Rc::new(TensorRef {
            storage,
            offset,
            shape,
            stride,
        })))
    }

    /// REDUCE / NEWOBJ: call `func(*args)` for the callables we know; anything else becomes an
    /// opaque object.
    fn call(&self, func: Value, args: Value) -> Result<Value, PickleError> {
        // Borrowed, not copied: a memoised tuple of many items may be called many times.
        let args: Rc<Items<Value>> = match args {
            Value::Tuple(t) => t,
            other => {
                return self.err(format!(
                    "call arguments are {}, expected a tuple",
                    other.kind()
                ))
            }
        };
        let args: &[Value] = &args.items;
        let Value::Global(module, name) = &func else {
            return Ok(Value::Opaque(format!("call of {}", func.kind())));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                Ok(Value::Dict(Rc::default()))
            }
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                self.rebuild_tensor(args)
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => self.err("_rebuild_parameter without a tensor"),
            },
            // `_rebuild_from_type_v2(func, new_type, args, state)`: tensor subclasses.
            ("torch._tensor", "_rebuild_from_type_v2") => {
                if args.len() < 3 {
                    return self.err("_rebuild_from_type_v2 with fewer than 3 arguments");
                }
                self.call(args[0].clone(), args[2].clone())
            }
            // Protocol 2 pickles bytes as `_codecs.encode(str, 'latin1')`.
            ("_codecs", "encode") => match args.first() {
                Some(Value::Str(s)) => {
                    Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()))
                }
                _ => Ok(Value::Opaque("_codecs.encode".into())),
            },
            _ => Ok(Value::Opaque(format!("{module}.{name}"))),
        }
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.op_pos = self.pos;
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                // FRAME (protocol 4): the length is only a hint.
                0x95 => {
                    self.u64()?;
                }
                // STOP
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                // LONG1, LONG4: little-endian two's complement.
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let b = self.len_prefixed(n)?;
                    let v = if b.is_empty() {
                        Value::Int(0)
                    } else if b.len() <= 8 {
                        let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
                        let mut a = [fill; 8];
                        a[..b.len()].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(a))
                    } else {
                        Value::Opaque("int wider than 64 bits".into())
                    };
                    self.push(v)?
                }
                // INT, LONG (text)
                b'I' | b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => match s.parse::<i64>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => Value::Opaque("int wider than 64 bits".into()),
                        },
                    };
                    self.push(v)?
                }
                // BINFLOAT: big-endian f64.
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?
                }
                b'F' => {
                    let s = self.line()?;
                    match s.trim().parse::<f64>() {
                        Ok(f) => self.push(Value::Float(f))?,
                        Err(_) => return self.err(format!("bad FLOAT {s:?}")),
                    }
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.len_prefixed(n)?;
                    let s = self.utf8(b)?;
                    self.push(Value::Str(s))?
                }
                // UNICODE (raw-unicode-escape text; ASCII in practice)
                b'V' => {
                    let s = self.line()?;
                    self.push(Value::Str(Rc::from(s)))?
                }
                // BINSTRING, SHORT_BINSTRING (Python 2 str): treated as latin-1 text.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as u64
                    } else {
                        self.u8()? as u64
                    };
                    let b = self.len_prefixed(n)?;
                    self.push(Value::Str(b.iter().map(|&c| c as char).collect::<String>().into()))?
                }
                // STRING: a quoted repr.
                b'S' => {
                    let s = self.line()?;
                    let inner = s
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')));
                    match inner {
                        Some(i) => self.push(Value::Str(Rc::from(i)))?,
                        None => return self.err("STRING argument is not quoted"),
                    }
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.len_prefixed(n)?;
                    self.push(Value::Bytes(Rc::from(b)))?
                }
                b')' => {
                    let t = self.tuple(Vec::new())?;
                    self.push(t)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.push(t)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let t = self.tuple(items)?;
                    self.push(t)?
                }
                b']' => self.push(Value::List(Rc::default()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    let depth = self.depth_over(&items)?;
                    self.push(Value::List(Rc::new(RefCell::new(Items { items, depth }))))?
                }
                b'}' => self.push(Value::Dict(Rc::default()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::default()))?;
                    self.set_items(items)?
                }
                // EMPTY_SET, FROZENSET, ADDITEMS: sets do not occur in state dicts.
                0x8f => self.push(Value::Opaque("set".into()))?,
                0x91 => {
                    self.pop_mark()?;
                    self.push(Value::Opaque("frozenset".into()))?
                }
                0x90 => {
                    self.pop_mark()?;
                    self.top()?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                // POP, POP_MARK, DUP
                b'0' => {
                    if self.stack.pop().is_none() {
                        return self.err("POP on an empty stack");
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                // BINPUT, LONG_BINPUT, PUT, MEMOIZE
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                b'p' => {
                    let s = self.line()?;
                    let Ok(i) = s.parse::<u32>() else {
                        return self.err(format!("bad PUT index {s:?}"));
                    };
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                // BINGET, LONG_BINGET, GET
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                b'g' => {
                    let s = self.line()?;
                    let Ok(i) = s.parse::<u32>() else {
                        return self.err(format!("bad GET index {s:?}"));
                    };
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                // GLOBAL, STACK_GLOBAL
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Value::Global(module, name))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.push(Value::Global(m.to_string(), n.to_string()))?
                        },
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.push(v)?
                }
                // NEWOBJ_EX(cls, args, kwargs)
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v)?
                }
                // BUILD: object state (an OrderedDict's `_metadata`, a Parameter's hooks, an
                // optimizer object's fields). Nothing the weights need; the object stays.
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                // BINPERSID, PERSID
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?
                }
                b'P' => return self.err("text persistent ids (PERSID) are not used by torch.save"),
                other => {
                    return self.err(format!(
                        "unsupported pickle opcode 0x{other:02x} (this reader follows what torch.save writes)"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.save({'a': tensor}, ...)` as protocol 2 writes it (hand-assembled).
    fn sample() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        p.extend(b"X\x01\x00\x00\x00a");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)RtR");
        p.extend(b"X\x01\x00\x00\x00bG\x3f\xf8\x00\x00\x00\x00\x00\x00");
        p.extend(b"u.");
        p
    }

    #[test]
    fn dup_and_memo_share_bytes_instead_of_copying() {
        // A 1 MiB bytes object, memoised, then DUP and BINGET many times: every copy must be the
        // same allocation (a deep copy each would make this pickle demand gigabytes).
        let mut p = vec![0x80, 2, b'('];
        p.push(b'B');
        p.extend((1u32 << 20).to_le_bytes());
        p.extend(vec![7u8; 1 << 20]);
        p.extend(b"q\x00");
        for _ in 0..1000 {
            p.extend(b"2h\x00");
        }
        p.extend(b"l.");
        let Value::List(l) = load(&p).unwrap() else {
            panic!("not a list")
        };
        let l = l.borrow();
        assert_eq!(l.items.len(), 2001);
        let Value::Bytes(first) = &l.items[0] else {
            panic!("not bytes")
        };
        for v in &l.items {
            let Value::Bytes(b) = v else {
                panic!("not bytes")
            };
            assert!(Rc::ptr_eq(b, first));
        }
    }

    #[test]
    fn object_count_is_capped_with_the_limit_named() {
        let mut p = vec![0x80, 2];
        for _ in 0..=MAX_OBJECTS {
            p.extend(b"N0");
        }
        p.extend(b"N.");
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("more than 10000000 objects (limit)"), "{err}");
    }

    #[test]
    fn memo_size_is_capped_with_the_limit_named() {
        let mut p = vec![0x80, 2, b'N'];
        for i in 0..=MAX_MEMO as u32 {
            p.push(b'r');
            p.extend(i.to_le_bytes());
        }
        p.push(b'.');
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("memo entries (limit)"), "{err}");
    }

    #[test]
    fn reads_a_state_dict() {
        let v = load(&sample()).unwrap();
        let Value::Dict(d) = v else {
            panic!("not a dict")
        };
        let d = &d.borrow().items;
        assert_eq!(d.len(), 2);
        let Value::Tensor(t) = &d[0].1 else {
            panic!("not a tensor")
        };
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.dtype, SourceDType::F32);
        assert_eq!(t.storage.numel, 6);
        assert!(t.is_contiguous());
        assert!(matches!(d[1].1, Value::Float(f) if f == 1.5));
    }

    #[test]
    fn contiguity() {
        let s = Rc::new(Storage {
            dtype: SourceDType::F32,
            key: "0".into(),
            numel: 6,
        });
        let t = |shape: Vec<usize>, stride: Vec<usize>| TensorRef {
            storage: s.clone(),
            offset: 0,
            shape,
            stride,
        };
        assert!(t(vec![2, 3], vec![3, 1]).is_contiguous());
        assert!(!t(vec![2, 3], vec![1, 2]).is_contiguous());
        assert!(t(vec![1, 6], vec![99, 1]).is_contiguous());
        assert!(t(vec![], vec![]).is_contiguous());
    }

    #[test]
    fn damaged_pickles_give_errors_not_panics() {
        let good = sample();
        // Every truncation.
        for n in 0..good.len() {
            assert!(load(&good[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        // Deterministic byte flips; any result but a panic is fine.
        let mut rng = crate::rng::SplitMix64(1);
        for _ in 0..5000 {
            let s = rng.next_u64();
            let mut bad = good.clone();
            let i = (s % bad.len() as u64) as usize;
            bad[i] = (s >> 32) as u8;
            let _ = load(&bad);
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 100000 nested one-tuples: an error, not a stack overflow.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.msg.contains("nested deeper"), "{e}");
        // A list appended to itself (through the memo) is refused the same way.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..200 {
            p.extend([b'h', 0, b'a']);
        }
        p.push(b'.');
        assert!(load(&p).is_err());
    }

    #[test]
    fn unknown_opcode_is_named() {
        let e = load(&[0x80, 2, 0xff]).unwrap_err();
        assert!(e.msg.contains("0xff"), "{e}");
        assert_eq!(e.pos, 2);
    }
}
