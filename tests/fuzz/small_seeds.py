"""Writes the small_* seeds of corpus/meta_graph and corpus/graph_def: input-closed
subgraphs cut out of the fixture .meta files, without the stripped op list and with
two entries per variable collection. Plain protobuf wire format; needs no TensorFlow.

    python3 tests/fuzz/small_seeds.py

Small seeds keep the fuzzers fast: the whole conv_bn.meta (145 kB) runs at about
1k executions per second, these at over 10k."""
import sys, os

def varint(b, i):
    x = s = 0
    while True:
        c = b[i]; i += 1
        x |= (c & 0x7f) << s; s += 7
        if c < 0x80: return x, i

def fields(b):
    i = 0; out = []
    while i < len(b):
        tag, i = varint(b, i); f, wt = tag >> 3, tag & 7
        if wt == 0:
            v, j = varint(b, i); out.append((f, wt, b[i:j])); i = j
        elif wt == 1: out.append((f, wt, b[i:i+8])); i += 8
        elif wt == 5: out.append((f, wt, b[i:i+4])); i += 4
        elif wt == 2:
            n, i = varint(b, i); out.append((f, wt, b[i:i+n])); i += n
        else: raise ValueError(wt)
    return out

def enc_varint(x):
    o = bytearray()
    while True:
        c = x & 0x7f; x >>= 7
        if x: o.append(c | 0x80)
        else: o.append(c); return bytes(o)

def emit(fs):
    o = bytearray()
    for f, wt, v in fs:
        o += enc_varint(f << 3 | wt)
        if wt == 2: o += enc_varint(len(v))
        o += v
    return bytes(o)

def node_info(nb):
    name = op = None; ins = []
    for f, wt, v in fields(nb):
        if f == 1: name = v.decode()
        elif f == 2: op = v.decode()
        elif f == 3: ins.append(v.decode().lstrip('^').split(':')[0])
    return name, op, ins

def closure(nodes, roots, limit):
    by = {node_info(n)[0]: n for n in nodes}
    keep = []; seen = set(); stack = list(roots)
    while stack and len(keep) < limit:
        r = stack.pop()
        if r in seen or r not in by: continue
        seen.add(r); keep.append(r)
        stack.extend(node_info(by[r])[2])
    # input-closed: drop nodes whose inputs were cut
    ok = set(keep)
    changed = True
    while changed:
        changed = False
        for k in list(ok):
            if any(i not in ok for i in node_info(by[k])[2]):
                ok.discard(k); changed = True
    return [n for n in nodes if node_info(n)[0] in ok]

def shrink_graph(gb, roots, limit):
    fs = fields(gb)
    nodes = [v for f, wt, v in fs if f == 1]
    kept = closure(nodes, roots, limit)
    return emit([(1, 2, n) for n in kept] + [x for x in fs if x[0] != 1])

def shrink_collection(entry):
    out = []
    for f, wt, v in fields(entry):
        if f == 2:  # CollectionDef
            cd = []
            for cf, cwt, cv in fields(v):
                if cf == 2:  # bytes_list
                    vals = [x for x in fields(cv) if x[0] == 1][:2]
                    cv = emit(vals)
                cd.append((cf, cwt, cv))
            v = emit(cd)
        out.append((f, wt, v))
    return emit(out)

def shrink_meta(mb, roots, limit, collections=("variables", "trainable_variables")):
    out = []
    for f, wt, v in fields(mb):
        if f == 1:  # MetaInfoDef without its stripped_op_list
            v = emit([x for x in fields(v) if x[0] != 2])
        elif f == 2:
            v = shrink_graph(v, roots, limit)
        elif f == 4:
            key = [x for x in fields(v) if x[0] == 1][0][2].decode()
            if key not in collections: continue
            v = shrink_collection(v)
        elif f == 5:
            continue
        out.append((f, wt, v))
    return emit(out)

def names_ops(gb):
    return [node_info(v)[:2] for f, wt, v in fields(gb) if f == 1]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    fixtures = os.path.join(here, "..", "..", "fixtures")
    corpus = os.path.join(here, "corpus")
    cb = open(os.path.join(fixtures, "conv_bn", "best_validation.meta"), "rb").read()
    dt = open(os.path.join(fixtures, "dtypes", "best_validation.meta"), "rb").read()
    dt_graph = [v for f, wt, v in fields(dt) if f == 2][0]
    assigns = [n for n, o in names_ops(dt_graph) if o == "Assign"][:6]
    metas = {
        "small_forward": shrink_meta(cb, ["output/probs"], 90),
        "small_accuracy": shrink_meta(cb, ["train/Mean_1"], 40),
        "small_bn": shrink_meta(cb, ["conv1/bn/FusedBatchNorm", "conv1/bn/moments/Squeeze_1"], 40),
        "small_loss": shrink_meta(cb, ["train/SparseSoftmaxCrossEntropyWithLogits/Select"], 40),
        "small_dtypes": shrink_meta(dt, assigns, 40),
    }
    for name, meta in metas.items():
        graph = [v for f, wt, v in fields(meta) if f == 2][0]
        with open(os.path.join(corpus, "meta_graph", name + ".meta"), "wb") as f:
            f.write(meta)
        with open(os.path.join(corpus, "graph_def", name + ".pb"), "wb") as f:
            f.write(graph)
        print(name, len(meta), len(graph), len(names_ops(graph)))


if __name__ == "__main__":
    main()
