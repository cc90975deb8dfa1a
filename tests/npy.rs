//! `.npy` reading and writing: byte-exact agreement with NumPy's writer, every
//! supported dtype, row ranges, and clear errors on damaged or unsupported files.

mod support;

use std::path::{Path, PathBuf};

use qpipe::ir::{DType, Tensor};
use qpipe::npy::{self, NpyReader, NpyWriter};
use support::tmp_dir;

fn tmp(name: &str) -> PathBuf {
    tmp_dir("npy").join(name)
}

fn numpy_header(dict: &str) -> Vec<u8> {
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    h.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.resize(total - 1, b' ');
    h.push(b'\n');
    h
}

fn err_of(bytes: &[u8]) -> String {
    npy::decode(bytes, Path::new("x.npy"))
        .unwrap_err()
        .to_string()
}

#[test]
fn writer_matches_numpy_bytes() {
    // np.save(np.arange(6, dtype='<f4').reshape(2, 3)): a 118-byte dict padded to 128.
    let t = Tensor::from_vec(vec![2, 3], &[0f32, 1., 2., 3., 4., 5.]);
    let bytes = npy::encode(&t).unwrap();
    let mut want =
        b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
            .to_vec();
    want.resize(127, b' ');
    want.push(b'\n');
    for v in [0f32, 1., 2., 3., 4., 5.] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(bytes, want);

    let b = npy::encode(&Tensor::from_vec(vec![3], &[true, false, true])).unwrap();
    assert_eq!(
        &b[..80],
        &numpy_header("{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }")[..80]
    );
    assert_eq!(b.len(), 131);
    let s = npy::encode(&Tensor::scalar(7i64)).unwrap();
    assert!(String::from_utf8_lossy(&s).contains("'shape': (), }"));
    assert_eq!(s.len(), 136);
}

#[test]
fn round_trip_every_dtype() {
    let cases = vec![
        Tensor::from_vec(vec![2, 2], &[1.5f32, -2.0, 3.25, f32::MAX]),
        Tensor::from_vec(vec![3], &[1.0f64, -1e300, 0.5]),
        Tensor::from_vec(
            vec![2],
            &[half::f16::from_f32(0.5), half::f16::from_f32(-3.0)],
        ),
        Tensor::from_vec(vec![3], &[-128i8, 0, 127]),
        Tensor::from_vec(vec![3], &[0u8, 128, 255]),
        Tensor::from_vec(vec![2], &[i16::MIN, i16::MAX]),
        Tensor::from_vec(vec![2, 1], &[i32::MIN, 7]),
        Tensor::from_vec(vec![2], &[i64::MIN, i64::MAX]),
        Tensor::from_vec(vec![1], &[u16::MAX]),
        Tensor::from_vec(vec![1], &[u32::MAX]),
        Tensor::from_vec(vec![1], &[u64::MAX]),
        Tensor::from_vec(vec![2, 2], &[true, false, false, true]),
        Tensor::from_vec(vec![0, 4], &Vec::<i32>::new()),
        Tensor::scalar(3.5f32),
    ];
    for t in cases {
        let p = tmp(&format!("rt-{}-{}.npy", t.dtype(), t.shape().len()));
        npy::write(&p, &t).unwrap();
        let back = npy::read(&p).unwrap();
        assert_eq!(back, t, "{}", t.dtype());
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() % 64, t.byte_size() % 64, "header is 64-aligned");
    }
}

#[test]
fn reads_versions_2_and_3_and_one_byte_descrs() {
    // np.lib.format.write_array(f, np.arange(3, dtype='<i2'), version=(2, 0))
    let mut v2 =
        b"\x93NUMPY\x02\x00t\x00\x00\x00{'descr': '<i2', 'fortran_order': False, 'shape': (3,), }"
            .to_vec();
    v2.resize(127, b' ');
    v2.push(b'\n');
    v2.extend_from_slice(&[0, 0, 1, 0, 2, 0]);
    let t = npy::decode(&v2, Path::new("v2.npy")).unwrap();
    assert_eq!(t.values::<i16>().unwrap(), vec![0, 1, 2]);
    let mut v3 = v2.clone();
    v3[6] = 3;
    v3[23..26].copy_from_slice(b"<u2");
    let t = npy::decode(&v3, Path::new("v3.npy")).unwrap();
    assert_eq!(t.dtype(), DType::U16);
    assert_eq!(t.values::<u16>().unwrap(), vec![0, 1, 2]);
    // A version 3 (UTF-8) header whose descr starts with a multi-byte character
    // (found by the npy fuzz target: slicing it at byte 1 panicked).
    let mut v3 = v2.clone();
    v3[6] = 3;
    v3[23..26].copy_from_slice("\u{216}2".as_bytes());
    let e = npy::decode(&v3, Path::new("v3.npy"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported dtype '\u{216}2'"), "{e}");

    for d in ["|i1", "<i1"] {
        let mut b = numpy_header(&format!(
            "{{'descr': '{d}', 'fortran_order': False, 'shape': (2,), }}"
        ));
        b.extend_from_slice(&[0xff, 0x01]);
        let t = npy::decode(&b, Path::new("i1.npy")).unwrap();
        assert_eq!(t.values::<i8>().unwrap(), vec![-1, 1], "{d}");
    }
    // Any non-zero byte is true; the tensor holds canonical 0/1.
    let mut b = numpy_header("{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }");
    b.extend_from_slice(&[0, 7]);
    let t = npy::decode(&b, Path::new("b.npy")).unwrap();
    assert_eq!(t.bytes(), &[0, 1]);
}

#[test]
fn header_dict_order_and_spacing_do_not_matter() {
    let mut b = numpy_header("{\"shape\":(2,3),'fortran_order':False,'descr':'<f4'}");
    b.extend_from_slice(&[0u8; 24]);
    let t = npy::decode(&b, Path::new("o.npy")).unwrap();
    assert_eq!(t.shape(), &[2, 3]);
}

#[test]
fn refuses_unsupported_and_damaged_files() {
    let fortran = numpy_header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }");
    let mut f = fortran.clone();
    f.extend_from_slice(&[0u8; 16]);
    assert!(err_of(&f).contains("fortran_order"), "{}", err_of(&f));

    let mut be = numpy_header("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }");
    be.extend_from_slice(&[0u8; 4]);
    let e = err_of(&be);
    assert!(e.contains("big-endian") && e.contains(">f4"), "{e}");

    let mut s = numpy_header("{'descr': '<U3', 'fortran_order': False, 'shape': (1,), }");
    s.extend_from_slice(&[0u8; 12]);
    assert!(err_of(&s).contains("unsupported dtype '<U3'"));

    let mut st = numpy_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }");
    st.extend_from_slice(&[0u8; 4]);
    assert!(err_of(&st).contains("structured"), "{}", err_of(&st));

    // Data shorter or longer than the shape says: refused before allocating anything.
    let mut short = numpy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 3), }");
    short.extend_from_slice(&[0u8; 35]);
    let e = err_of(&short);
    assert!(
        e.contains("needs 36 data bytes, the file has 35") && e.starts_with("x.npy: "),
        "{e}"
    );
    let mut long = numpy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }");
    long.extend_from_slice(&[0u8; 5]);
    assert!(err_of(&long).contains("needs 4 data bytes, the file has 5"));

    // A shape whose byte count overflows must not be trusted.
    let huge = numpy_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904), }",
    );
    assert!(err_of(&huge).contains("too large"), "{}", err_of(&huge));
    let big = numpy_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }");
    assert!(err_of(&big).contains("needs 8000000000000 data bytes"));

    assert!(err_of(b"PK\x03\x04 not numpy").contains("bad magic"));
    let mut v9 = fortran.clone();
    v9[6] = 9;
    assert!(err_of(&v9).contains("version 9.0"));
    let mut trunc = b"\x93NUMPY\x01\x00\xff\x00{'descr'".to_vec();
    trunc.extend_from_slice(&[b' '; 10]);
    assert!(err_of(&trunc).contains("header says 255 bytes"));
    let mut extra = numpy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}");
    extra.extend_from_slice(&[0u8; 4]);
    assert!(err_of(&extra).contains("unexpected header key 'x'"));
    let mut neg = numpy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }");
    neg.extend_from_slice(&[0u8; 4]);
    assert!(err_of(&neg).contains("non-negative dimension"));
    let mut missing = numpy_header("{'descr': '<f4', 'shape': (1,), }");
    missing.extend_from_slice(&[0u8; 4]);
    assert!(err_of(&missing).contains("no 'fortran_order'"));
}

#[test]
fn error_names_the_file() {
    let p = tmp("broken.npy");
    std::fs::write(&p, b"\x93NUMPY\x01\x00").unwrap();
    let e = NpyReader::open(&p).err().unwrap().to_string();
    assert!(e.contains("broken.npy"), "{e}");
    let e = npy::read(&tmp("does-not-exist.npy"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does-not-exist.npy"), "{e}");
}

#[test]
fn reads_row_ranges() {
    let vals: Vec<i32> = (0..5 * 3 * 2).collect();
    let t = Tensor::from_vec(vec![5, 3, 2], &vals);
    let p = tmp("rows.npy");
    npy::write(&p, &t).unwrap();
    let r = NpyReader::open(&p).unwrap();
    assert_eq!(
        (r.rows(), r.dtype(), r.shape()),
        (5, DType::I32, &[5usize, 3, 2][..])
    );
    let mid = r.read_rows(1, 3).unwrap();
    assert_eq!(mid.shape(), &[2, 3, 2]);
    assert_eq!(mid.values::<i32>().unwrap(), (6..18).collect::<Vec<_>>());
    assert_eq!(r.read_rows(4, 4).unwrap().shape(), &[0, 3, 2]);
    let e = r.read_rows(3, 6).unwrap_err().to_string();
    assert!(
        e.contains("rows 3..6 are out of range (the file has 5)") && e.contains("rows.npy"),
        "{e}"
    );
    // Concurrent readers share one handle.
    let parts: Vec<Vec<i32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..5)
            .map(|i| {
                let r = &r;
                s.spawn(move || r.read_rows(i, i + 1).unwrap().values::<i32>().unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(parts.concat(), vals);
}

#[test]
fn streaming_writer() {
    let p = tmp("stream.npy");
    let mut w = NpyWriter::create(&p, DType::F32, 3, &[2]).unwrap();
    w.write_rows(&Tensor::from_vec(vec![2, 2], &[1f32, 2., 3., 4.]))
        .unwrap();
    let e = w
        .write_rows(&Tensor::from_vec(vec![1, 3], &[0f32; 3]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit"), "{e}");
    w.write_rows(&Tensor::from_vec(vec![1, 2], &[5f32, 6.]))
        .unwrap();
    w.finish().unwrap();
    assert_eq!(
        npy::read(&p).unwrap(),
        Tensor::from_vec(vec![3, 2], &[1f32, 2., 3., 4., 5., 6.])
    );
    let mut w = NpyWriter::create(&tmp("short.npy"), DType::F32, 3, &[]).unwrap();
    w.write_rows(&Tensor::from_vec(vec![1], &[1f32])).unwrap();
    assert!(w
        .finish()
        .unwrap_err()
        .to_string()
        .contains("1 of 3 rows written"));
    assert!(npy::encode(&Tensor::from_vec(vec![1], &[half::bf16::ONE]))
        .unwrap_err()
        .to_string()
        .contains("bfloat16"));
}
