//! The IR's own binary form, stored by the pipeline cache. It is deterministic
//! (attributes are in a `BTreeMap`, everything else is in graph order), versioned
//! by its magic, and its reader checks every length against the bytes that remain
//! before allocating, so a damaged cache file is an error, never a crash.

use std::collections::BTreeMap;

use super::{Attr, DType, Graph, IrError, Node, QuantParams, Tensor, TensorData, TensorRef};

const MAGIC: &[u8; 8] = b"QPIR\0\0\0\x01";

pub fn encode(g: &Graph) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024 + g.nodes.len() * 64);
    encode_to(g, &mut |b: &[u8]| out.extend_from_slice(b));
    out
}

/// Streams the encoding of `g` through `sink` in pieces: small fields are gathered
/// into a 64 KiB buffer, tensor data is handed over straight from the tensor. The
/// concatenated pieces equal [`encode`]'s bytes, so a caller can hash or write a
/// large graph without holding its encoding in memory.
pub fn encode_to(g: &Graph, sink: &mut dyn FnMut(&[u8])) {
    let mut w = Writer {
        out: Vec::with_capacity(BUFFERED),
        sink,
    };
    w.out.extend_from_slice(MAGIC);
    w.u64(g.producer as i64 as u64);
    w.bytes(&g.library);
    w.u64(g.inputs.len() as u64);
    for s in &g.inputs {
        w.str(s);
    }
    w.u64(g.outputs.len() as u64);
    for r in &g.outputs {
        w.tref(r);
    }
    w.u64(g.nodes.len() as u64);
    for n in &g.nodes {
        w.node(n);
    }
    w.flush();
}

pub fn decode(bytes: &[u8]) -> Result<Graph, IrError> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(IrError::new(
            "not a qpipe IR file (bad magic or unsupported version)",
        ));
    }
    let producer = r.u64()? as i64 as i32;
    let library = r.bytes()?.to_vec();
    let n = r.count(1)?;
    let inputs = (0..n).map(|_| r.string()).collect::<Result<_, _>>()?;
    let n = r.count(1)?;
    let outputs = (0..n).map(|_| r.tref()).collect::<Result<_, _>>()?;
    let n = r.count(8)?;
    let nodes = (0..n).map(|_| r.node()).collect::<Result<_, _>>()?;
    if r.pos != bytes.len() {
        return Err(IrError::new(format!(
            "{} trailing bytes after the graph",
            bytes.len() - r.pos
        )));
    }
    Ok(Graph {
        nodes,
        inputs,
        outputs,
        producer,
        library,
    })
}

const BUFFERED: usize = 64 << 10;

struct Writer<'s> {
    out: Vec<u8>,
    sink: &'s mut dyn FnMut(&[u8]),
}

impl Writer<'_> {
    fn flush(&mut self) {
        if !self.out.is_empty() {
            (self.sink)(&self.out);
            self.out.clear();
        }
    }
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        if b.len() >= BUFFERED {
            self.flush();
            (self.sink)(b);
            return;
        }
        self.out.extend_from_slice(b);
        if self.out.len() >= BUFFERED {
            self.flush();
        }
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn tref(&mut self, r: &TensorRef) {
        self.str(&r.node);
        self.u32(r.index);
    }
    fn shape(&mut self, s: &Option<Vec<i64>>) {
        match s {
            None => self.u8(0),
            Some(d) => {
                self.u8(1);
                self.u64(d.len() as u64);
                d.iter().for_each(|&x| self.u64(x as u64));
            }
        }
    }
    fn tensor(&mut self, t: &Tensor) {
        self.u8(t.dtype().code());
        self.u64(t.shape().len() as u64);
        t.shape().iter().for_each(|&d| self.u64(d as u64));
        match t.data() {
            TensorData::Bytes(b) => self.bytes(b),
            TensorData::Strings(s) => s.iter().for_each(|e| self.bytes(e)),
        }
    }
    fn attr(&mut self, a: &Attr) {
        match a {
            Attr::Int(v) => {
                self.u8(0);
                self.u64(*v as u64)
            }
            Attr::Float(v) => {
                self.u8(1);
                self.u32(v.to_bits())
            }
            Attr::Bool(v) => {
                self.u8(2);
                self.u8(*v as u8)
            }
            Attr::Str(v) => {
                self.u8(3);
                self.bytes(v)
            }
            Attr::Type(v) => {
                self.u8(4);
                self.u8(v.code())
            }
            Attr::Shape(v) => {
                self.u8(5);
                self.shape(v)
            }
            Attr::Tensor(t) => {
                self.u8(6);
                self.tensor(t)
            }
            Attr::Ints(v) => {
                self.u8(7);
                self.u64(v.len() as u64);
                v.iter().for_each(|&x| self.u64(x as u64));
            }
            Attr::Floats(v) => {
                self.u8(8);
                self.u64(v.len() as u64);
                v.iter().for_each(|x| self.u32(x.to_bits()));
            }
            Attr::Bools(v) => {
                self.u8(9);
                self.u64(v.len() as u64);
                v.iter().for_each(|&x| self.u8(x as u8));
            }
            Attr::Strs(v) => {
                self.u8(10);
                self.u64(v.len() as u64);
                v.iter().for_each(|x| self.bytes(x));
            }
            Attr::Types(v) => {
                self.u8(11);
                self.u64(v.len() as u64);
                v.iter().for_each(|x| self.u8(x.code()));
            }
            Attr::Shapes(v) => {
                self.u8(12);
                self.u64(v.len() as u64);
                v.iter().for_each(|x| self.shape(x));
            }
            Attr::Opaque(v) => {
                self.u8(13);
                self.bytes(v)
            }
        }
    }
    fn node(&mut self, n: &Node) {
        self.str(&n.name);
        self.str(&n.op);
        self.str(&n.device);
        self.u64(n.inputs.len() as u64);
        n.inputs.iter().for_each(|r| self.tref(r));
        self.u64(n.control_inputs.len() as u64);
        n.control_inputs.iter().for_each(|c| self.str(c));
        self.u64(n.attrs.len() as u64);
        for (k, v) in &n.attrs {
            self.str(k);
            self.attr(v);
        }
        self.u64(n.output_quant.len() as u64);
        for (k, q) in &n.output_quant {
            self.u32(*k);
            self.u64(q.scale.len() as u64);
            q.scale.iter().for_each(|s| self.u32(s.to_bits()));
            self.u64(q.zero_point.len() as u64);
            q.zero_point.iter().for_each(|&z| self.u64(z as u64));
            match q.axis {
                None => self.u8(0),
                Some(a) => {
                    self.u8(1);
                    self.u32(a)
                }
            }
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], IrError> {
        if n > self.remaining() {
            return Err(IrError::new(format!(
                "truncated at byte {}: need {n} more bytes",
                self.pos
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, IrError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, IrError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, IrError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A element count, each element needing at least `min_size` bytes of what remains.
    fn count(&mut self, min_size: usize) -> Result<usize, IrError> {
        let n = self.u64()?;
        if n > (self.remaining() / min_size.max(1)) as u64 {
            return Err(IrError::new(format!(
                "count {n} at byte {} exceeds the file",
                self.pos - 8
            )));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], IrError> {
        let n = self.count(1)?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, IrError> {
        let at = self.pos;
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| IrError::new(format!("invalid UTF-8 string at byte {at}")))
    }
    fn tref(&mut self) -> Result<TensorRef, IrError> {
        Ok(TensorRef {
            node: self.string()?,
            index: self.u32()?,
        })
    }
    fn dtype(&mut self) -> Result<DType, IrError> {
        let c = self.u8()?;
        DType::from_code(c)
            .ok_or_else(|| IrError::new(format!("unknown dtype code {c} at byte {}", self.pos - 1)))
    }
    fn shape(&mut self) -> Result<Option<Vec<i64>>, IrError> {
        match self.u8()? {
            0 => Ok(None),
            _ => {
                let n = self.count(8)?;
                Ok(Some(
                    (0..n)
                        .map(|_| self.u64().map(|v| v as i64))
                        .collect::<Result<_, _>>()?,
                ))
            }
        }
    }
    fn tensor(&mut self) -> Result<Tensor, IrError> {
        let dtype = self.dtype()?;
        let rank = self.count(8)?;
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            let d = self.u64()?;
            shape.push(
                usize::try_from(d).map_err(|_| IrError::new(format!("dimension {d} too large")))?,
            );
        }
        if dtype == DType::String {
            let n = super::num_elements(&shape)
                .ok_or_else(|| IrError::new(format!("shape {shape:?} overflows")))?;
            if n > self.remaining() / 8 {
                return Err(IrError::new(format!(
                    "string tensor of {n} elements exceeds the file"
                )));
            }
            let strings = (0..n)
                .map(|_| self.bytes().map(<[u8]>::to_vec))
                .collect::<Result<_, _>>()?;
            Tensor::from_strings(shape, strings)
        } else {
            let data = self.bytes()?;
            Tensor::from_bytes(dtype, shape, data)
        }
    }
    fn attr(&mut self) -> Result<Attr, IrError> {
        let tag = self.u8()?;
        Ok(match tag {
            0 => Attr::Int(self.u64()? as i64),
            1 => Attr::Float(f32::from_bits(self.u32()?)),
            2 => Attr::Bool(self.u8()? != 0),
            3 => Attr::Str(self.bytes()?.to_vec()),
            4 => Attr::Type(self.dtype()?),
            5 => Attr::Shape(self.shape()?),
            6 => Attr::Tensor(self.tensor()?),
            7 => {
                let n = self.count(8)?;
                Attr::Ints(
                    (0..n)
                        .map(|_| self.u64().map(|v| v as i64))
                        .collect::<Result<_, _>>()?,
                )
            }
            8 => {
                let n = self.count(4)?;
                Attr::Floats(
                    (0..n)
                        .map(|_| self.u32().map(f32::from_bits))
                        .collect::<Result<_, _>>()?,
                )
            }
            9 => {
                let n = self.count(1)?;
                Attr::Bools(
                    (0..n)
                        .map(|_| self.u8().map(|v| v != 0))
                        .collect::<Result<_, _>>()?,
                )
            }
            10 => {
                let n = self.count(8)?;
                Attr::Strs(
                    (0..n)
                        .map(|_| self.bytes().map(<[u8]>::to_vec))
                        .collect::<Result<_, _>>()?,
                )
            }
            11 => {
                let n = self.count(1)?;
                Attr::Types((0..n).map(|_| self.dtype()).collect::<Result<_, _>>()?)
            }
            12 => {
                let n = self.count(1)?;
                Attr::Shapes((0..n).map(|_| self.shape()).collect::<Result<_, _>>()?)
            }
            13 => Attr::Opaque(self.bytes()?.to_vec()),
            t => {
                return Err(IrError::new(format!(
                    "unknown attribute tag {t} at byte {}",
                    self.pos - 1
                )))
            }
        })
    }
    fn node(&mut self) -> Result<Node, IrError> {
        let name = self.string()?;
        let op = self.string()?;
        let device = self.string()?;
        let n = self.count(12)?;
        let inputs = (0..n).map(|_| self.tref()).collect::<Result<_, _>>()?;
        let n = self.count(8)?;
        let control_inputs = (0..n).map(|_| self.string()).collect::<Result<_, _>>()?;
        let n = self.count(9)?;
        let mut attrs = BTreeMap::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.attr()?;
            attrs.insert(k, v);
        }
        let n = self.count(21)?;
        let mut output_quant = BTreeMap::new();
        for _ in 0..n {
            let k = self.u32()?;
            let ns = self.count(4)?;
            let scale = (0..ns)
                .map(|_| self.u32().map(f32::from_bits))
                .collect::<Result<_, _>>()?;
            let nz = self.count(8)?;
            let zero_point = (0..nz)
                .map(|_| self.u64().map(|v| v as i64))
                .collect::<Result<_, _>>()?;
            let axis = match self.u8()? {
                0 => None,
                _ => Some(self.u32()?),
            };
            output_quant.insert(
                k,
                QuantParams {
                    scale,
                    zero_point,
                    axis,
                },
            );
        }
        Ok(Node {
            name,
            op,
            inputs,
            control_inputs,
            device,
            attrs,
            output_quant,
        })
    }
}
