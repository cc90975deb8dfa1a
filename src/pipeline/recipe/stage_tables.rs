//! The `[stages.*]` tables: each stage built from its kind's registry entry, matrix
//! expansion into variants, references between stages, their order and output paths.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use petgraph::graph::DiGraph;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{Parser, RecipeStage, Value};
use crate::error::{Error, Result};
use crate::pipeline::fsutil;
use crate::pipeline::recipe_check::{is_simple_id, non_finite_float};
use crate::spec::DatasetSpec;
use crate::stages::{ConfigError, ConfigTable, Stage};

/// A `[stages.ID]` table as written.
pub(super) struct Proto<'t> {
    pub(super) id: String,
    pub(super) id_span: Range<usize>,
    pub(super) kind: &'static str,
    pub(super) build: crate::stages::registry::BuildFn,
    pub(super) table: Spanned<DeTable<'t>>,
    /// (key, key span, values)
    pub(super) matrix: Vec<(String, Range<usize>, Vec<Value<'t>>)>,
}

/// A matrix dimension: the stage that declares it and the key.
pub(super) type Dim = (usize, String);

/// A stage being expanded: its variant so far and the references rewritten to variants.
pub(super) type Partial = (BTreeMap<Dim, String>, Vec<(String, String)>);

/// An expanded stage, built, with the config table it was built from.
pub(super) type Built<'t> = (Instance, Box<dyn Stage>, ConfigTable<'t>);

/// One expanded stage before it is built for good.
pub(super) struct Instance {
    pub(super) name: String,
    pub(super) variant: BTreeMap<Dim, String>,
}

/// The dotted key path (inside `table`) whose key or value contains `offset`.
pub(super) fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    let mut best: Option<String> = None;
    let mut stack: Vec<(String, &Value<'_>)> = Vec::new();
    for (k, v) in table.iter() {
        if k.span().contains(&offset) {
            return Some(k.get_ref().to_string());
        }
        stack.push((k.get_ref().to_string(), v));
    }
    while let Some((path, v)) = stack.pop() {
        // A sub-table written as its own `[header]` has a span that need not hold
        // its keys, so tables are searched whatever their span.
        if v.span().contains(&offset) {
            best = Some(path.clone());
        } else if !matches!(v.get_ref(), DeValue::Table(_)) {
            continue;
        }
        if let DeValue::Table(t) = v.get_ref() {
            for (k, e) in t.iter() {
                let p = format!("{path}.{}", k.get_ref());
                if k.span().contains(&offset) {
                    return Some(p);
                }
                stack.push((p, e));
            }
        }
    }
    best
}

/// How a matrix value appears in stage names and `${key}`.
pub(super) fn scalar_text(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        other => other.type_str().to_string(),
    }
}

/// `${key}` → value for the given keys, leaving other placeholders alone.
pub(super) fn substitute_known(table: &mut DeTable<'_>, values: &BTreeMap<String, String>) {
    if values.is_empty() {
        return;
    }
    let mut stack: Vec<&mut Value<'_>> = table.iter_mut().map(|(_, v)| v).collect();
    while let Some(v) = stack.pop() {
        match v.get_mut() {
            DeValue::String(s) if s.contains("${") => {
                let mut out = s.to_string();
                for (k, val) in values {
                    out = out.replace(&format!("${{{k}}}"), val);
                }
                *s = Cow::Owned(out);
            }
            DeValue::Array(a) => stack.extend(a.iter_mut()),
            DeValue::Table(t) => stack.extend(t.iter_mut().map(|(_, v)| v)),
            _ => {}
        }
    }
}

pub(super) fn expand_placeholders(
    s: &str,
    values: &BTreeMap<String, String>,
    ambiguous: &BTreeSet<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed '${{' in '{s}'"))?;
        let name = &after[..end];
        if ambiguous.contains(name) {
            return Err(format!(
                "'${{{name}}}' is ambiguous: two matrices vary '{name}' for this stage"
            ));
        }
        let v = values.get(name).ok_or_else(|| {
            if values.is_empty() {
                format!("'${{{name}}}' used, but no matrix applies to this stage")
            } else {
                let known: Vec<&str> = values.keys().map(String::as_str).collect();
                format!(
                    "'${{{name}}}' is not a matrix key of this stage (keys: {})",
                    known.join(", ")
                )
            }
        })?;
        out.push_str(v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The dotted key and span of a string value `s` in `table` or its sub-tables (where a
/// stage named a data set). An explicit stack keeps the depth independent of the input.
fn find_string(table: &DeTable<'_>, s: &str) -> Option<(String, Range<usize>)> {
    let mut stack: Vec<(String, &Value<'_>)> = table
        .iter()
        .rev()
        .map(|(k, v)| (k.get_ref().to_string(), v))
        .collect();
    while let Some((path, v)) = stack.pop() {
        match v.get_ref() {
            DeValue::String(x) if x.as_ref() == s => return Some((path, v.span())),
            DeValue::Table(t) => {
                stack.extend(
                    t.iter()
                        .rev()
                        .map(|(k, e)| (format!("{path}.{}", k.get_ref()), e)),
                );
            }
            _ => {}
        }
    }
    None
}

/// The most stages a recipe may expand to.
pub(super) const MAX_STAGES: usize = 10_000;

impl<'s, 't> Parser<'s, 't> {
    pub(super) fn stages(
        &self,
        v: &Value<'t>,
        datasets: &BTreeMap<String, DatasetSpec>,
        out_dir: &Path,
        allow_outside: bool,
    ) -> Result<Vec<RecipeStage>> {
        let mut protos = Vec::new();
        for (id, sv) in self.table(v, "stages")?.iter() {
            protos.push(self.proto(id, sv)?);
        }
        protos.sort_by_key(|p| p.table.span().start);
        let index: HashMap<&str, usize> = protos
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i))
            .collect();

        // Pass 1: build each combination once to learn its references.
        let mut combos: Vec<Vec<Vec<(String, Value<'t>)>>> = Vec::new();
        let mut refs: Vec<Vec<Vec<(String, String)>>> = Vec::new();
        let mut edges: Vec<(usize, usize, String, String)> = Vec::new();
        for (pi, p) in protos.iter().enumerate() {
            let cs = self.combinations(p)?;
            let mut proto_refs = Vec::new();
            for c in &cs {
                let own: BTreeMap<String, String> = c
                    .iter()
                    .map(|(k, v)| (k.clone(), scalar_text(v.get_ref())))
                    .collect();
                let table = self.instance_table(p, c, &own, false)?;
                let stage = self.build(p, &table)?;
                let deps = stage.deps();
                for (key, target) in &deps.stages {
                    let base = target.split('@').next().unwrap_or(target);
                    let Some(&ti) = index.get(base) else {
                        let span = crate::stages::lookup(&table, key)
                            .map(|v| v.span())
                            .unwrap_or(p.table.span());
                        let known: Vec<&str> = protos.iter().map(|p| p.id.as_str()).collect();
                        return Err(self.src.err(
                            span,
                            &format!("stages.{}.{key}", p.id),
                            format!("unknown stage '{target}' (stages: {})", known.join(", ")),
                        ));
                    };
                    edges.push((ti, pi, key.clone(), target.clone()));
                }
                proto_refs.push(deps.stages);
            }
            combos.push(cs);
            refs.push(proto_refs);
        }
        let order = self.topo_order(&protos, &edges)?;

        // Pass 2: expand in dependency order and build for good.
        let mut instances: Vec<Vec<Instance>> = (0..protos.len()).map(|_| Vec::new()).collect();
        let mut built: Vec<Vec<Built<'t>>> = (0..protos.len()).map(|_| Vec::new()).collect();
        let mut total = 0usize;
        for &pi in &order {
            let p = &protos[pi];
            for (c, crefs) in combos[pi].iter().zip(&refs[pi]) {
                let own: BTreeMap<Dim, String> = c
                    .iter()
                    .map(|(k, v)| ((pi, k.clone()), scalar_text(v.get_ref())))
                    .collect();
                let mut partial: Vec<Partial> = vec![(own, Vec::new())];
                for (key, target) in crefs {
                    let base = target.split('@').next().unwrap_or(target);
                    let Some(&ti) = index.get(base) else {
                        continue; // unreachable: pass 1 resolved every reference
                    };
                    let span = || {
                        crate::stages::lookup(p.table.get_ref(), key)
                            .map(|v| v.span())
                            .unwrap_or(p.table.span())
                    };
                    if base != target {
                        if !instances[ti].iter().any(|i| &i.name == target) {
                            let names: Vec<&str> =
                                instances[ti].iter().map(|i| i.name.as_str()).collect();
                            return Err(self.src.err(
                                span(),
                                &format!("stages.{}.{key}", p.id),
                                format!(
                                    "unknown stage variant '{target}' (variants: {})",
                                    names.join(", ")
                                ),
                            ));
                        }
                        continue;
                    }
                    let ups = &instances[ti];
                    if ups.len() == 1 && ups[0].variant.is_empty() {
                        continue;
                    }
                    let mut next = Vec::new();
                    for (variant, rewrites) in &partial {
                        for up in ups {
                            let compatible = up
                                .variant
                                .iter()
                                .all(|(d, v)| variant.get(d).is_none_or(|w| w == v));
                            if compatible {
                                let mut merged = variant.clone();
                                merged
                                    .extend(up.variant.iter().map(|(d, v)| (d.clone(), v.clone())));
                                let mut rw = rewrites.clone();
                                rw.push((key.clone(), up.name.clone()));
                                next.push((merged, rw));
                            }
                        }
                    }
                    partial = next;
                }
                for (variant, rewrites) in partial {
                    let name = if variant.is_empty() {
                        p.id.clone()
                    } else {
                        let values: Vec<&str> = variant.values().map(String::as_str).collect();
                        format!("{}@{}", p.id, values.join(","))
                    };
                    let mut by_key: BTreeMap<String, String> = BTreeMap::new();
                    let mut ambiguous: BTreeSet<String> = BTreeSet::new();
                    for ((_, k), v) in &variant {
                        if let Some(prev) = by_key.insert(k.clone(), v.clone()) {
                            if &prev != v {
                                ambiguous.insert(k.clone());
                            }
                        }
                    }
                    let mut table = self.instance_table(p, c, &BTreeMap::new(), true)?;
                    for (key, up_name) in &rewrites {
                        if let Some(v) = crate::stages::lookup_mut(&mut table, key) {
                            *v.get_mut() = DeValue::String(Cow::Owned(up_name.clone()));
                        }
                    }
                    self.substitute(p, &mut table, &by_key, &ambiguous)?;
                    let config = ConfigTable::new(Spanned::new(p.table.span(), table));
                    let stage = self.build_config(p, &config)?;
                    total += 1;
                    if total > MAX_STAGES {
                        return Err(self.src.err(
                            p.id_span.clone(),
                            &format!("stages.{}", p.id),
                            format!("the recipe expands to more than {MAX_STAGES} stages"),
                        ));
                    }
                    if built[pi].iter().any(|(i, _, _)| i.name == name) {
                        return Err(self.src.err(
                            p.id_span.clone(),
                            &format!("stages.{}", p.id),
                            format!("matrix values give two stages named '{name}'"),
                        ));
                    }
                    instances[pi].push(Instance {
                        name: name.clone(),
                        variant: variant.clone(),
                    });
                    built[pi].push((Instance { name, variant }, stage, config));
                }
            }
        }

        // Flatten in declaration order and resolve references, datasets and outputs.
        let mut stages: Vec<RecipeStage> = Vec::new();
        let mut configs: Vec<ConfigTable<'t>> = Vec::new();
        for (pi, list) in built.into_iter().enumerate() {
            for (inst, stage, config) in list {
                let deps = stage.deps();
                stages.push(RecipeStage {
                    id: inst.name,
                    kind: protos[pi].kind,
                    deps,
                    stage,
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    base_id: protos[pi].id.clone(),
                    variant: inst.variant.into_iter().map(|((_, k), v)| (k, v)).collect(),
                });
                configs.push(config);
            }
        }
        let by_name: HashMap<String, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let mut claimed: HashMap<PathBuf, String> = HashMap::new();
        for (i, config) in configs.iter().enumerate() {
            let base = stages[i].base_id.clone();
            let mut inputs = Vec::new();
            for (key, target) in &stages[i].deps.stages {
                let at = config.get(key).map(|v| v.span()).unwrap_or(config.span());
                let up = by_name.get(target).copied().ok_or_else(|| {
                    self.src.err(
                        at.clone(),
                        &format!("stages.{base}.{key}"),
                        format!("unknown stage '{target}'"),
                    )
                })?;
                if up == i {
                    return Err(self.src.err(
                        at,
                        &format!("stages.{base}.{key}"),
                        "a stage cannot read its own output",
                    ));
                }
                inputs.push((key.clone(), up));
            }
            for d in &stages[i].deps.datasets {
                if !datasets.contains_key(d) {
                    let (key, at) = find_string(config.table(), d)
                        .map(|(k, span)| (format!("stages.{base}.{k}"), span))
                        .unwrap_or((format!("stages.{base}"), config.span()));
                    let known: Vec<&str> = datasets.keys().map(String::as_str).collect();
                    return Err(self.src.err(
                        at,
                        &key,
                        format!("unknown dataset '{d}' (datasets: {})", known.join(", ")),
                    ));
                }
            }
            let mut outputs = Vec::new();
            for (key, path) in &stages[i].deps.outputs {
                let at = config.get(key).map(|v| v.span()).unwrap_or(config.span());
                let full_key = format!("stages.{base}.{key}");
                let resolved = self.output_path(&at, &full_key, path, out_dir, allow_outside)?;
                if let Some(other) = claimed.insert(resolved.clone(), stages[i].id.clone()) {
                    let hint = if stages[i].variant.is_empty() {
                        String::new()
                    } else {
                        let k = stages[i].variant.keys().next().cloned().unwrap_or_default();
                        format!(" (use ${{{k}}} in the path to tell variants apart)")
                    };
                    return Err(self.src.err(
                        at,
                        &full_key,
                        format!(
                            "'{}' is also written by stage '{other}'{hint}",
                            fsutil::shorten(&path.display().to_string())
                        ),
                    ));
                }
                outputs.push((path.to_string_lossy().into_owned(), resolved));
            }
            stages[i].inputs = inputs;
            stages[i].outputs = outputs;
        }
        Ok(stages)
    }

    pub(super) fn proto(&self, id: &Spanned<Cow<'t, str>>, sv: &Value<'t>) -> Result<Proto<'t>> {
        let key = format!("stages.{}", id.get_ref());
        if !is_simple_id(id.get_ref()) {
            return Err(self.src.err(
                id.span(),
                &key,
                "stage ids use letters, digits, '_', '-' and '.' ('@' is for matrix variants)",
            ));
        }
        let mut table = self.table(sv, &key)?.clone();
        if let Some((path, span, text)) = non_finite_float(&table) {
            return Err(self.src.err(
                span,
                &format!("{key}.{path}"),
                format!("{text} is not a finite number (NaN and infinities mean nothing in a stage setting)"),
            ));
        }
        let kind_v = table.remove("kind").ok_or_else(|| {
            self.src.err(
                sv.span(),
                &format!("{key}.kind"),
                "missing (the stage kind)",
            )
        })?;
        let kind = self.string(&kind_v, &format!("{key}.kind"))?;
        let factory = self
            .registry
            .iter()
            .find(|f| f.kind == kind)
            .ok_or_else(|| {
                let kinds: Vec<&str> = self.registry.iter().map(|f| f.kind).collect();
                self.src.err(
                    kind_v.span(),
                    &format!("{key}.kind"),
                    format!("unknown stage kind '{kind}' (kinds: {})", kinds.join(", ")),
                )
            })?;
        let mut matrix = Vec::new();
        if let Some(mv) = table.remove("matrix") {
            let mkey = format!("{key}.matrix");
            for (k, vals) in self.table(&mv, &mkey)?.iter() {
                let kk = format!("{mkey}.{}", k.get_ref());
                if matches!(k.get_ref().as_ref(), "kind" | "matrix") {
                    return Err(self
                        .src
                        .err(k.span(), &kk, "cannot vary the kind or the matrix"));
                }
                if table.contains_key(k.get_ref().as_ref()) {
                    return Err(self.src.err(
                        k.span(),
                        &kk,
                        "this key is also set outside the matrix",
                    ));
                }
                let arr = self.array(vals, &kk)?;
                if arr.is_empty() {
                    return Err(self.src.err(vals.span(), &kk, "give at least one value"));
                }
                for e in arr.iter() {
                    if !matches!(
                        e.get_ref(),
                        DeValue::String(_)
                            | DeValue::Integer(_)
                            | DeValue::Float(_)
                            | DeValue::Boolean(_)
                    ) {
                        return Err(self.src.err(
                            e.span(),
                            &kk,
                            "matrix values are strings, numbers or booleans",
                        ));
                    }
                }
                matrix.push((
                    k.get_ref().to_string(),
                    k.span(),
                    arr.iter().cloned().collect(),
                ));
            }
        }
        Ok(Proto {
            id: id.get_ref().to_string(),
            id_span: id.span(),
            kind: factory.kind,
            build: factory.build,
            table: Spanned::new(sv.span(), table),
            matrix,
        })
    }

    /// Every combination of a stage's matrix values (one empty combination without a matrix).
    pub(super) fn combinations(&self, p: &Proto<'t>) -> Result<Vec<Vec<(String, Value<'t>)>>> {
        let mut out: Vec<Vec<(String, Value<'t>)>> = vec![Vec::new()];
        for (k, _, vals) in &p.matrix {
            if out.len().saturating_mul(vals.len()) > MAX_STAGES {
                return Err(self.src.err(
                    p.id_span.clone(),
                    &format!("stages.{}.matrix", p.id),
                    format!("more than {MAX_STAGES} combinations"),
                ));
            }
            out = out
                .into_iter()
                .flat_map(|c| {
                    vals.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((k.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        Ok(out)
    }

    /// The stage table with one matrix combination filled in. In the first pass
    /// (`final_pass == false`) `${key}` is replaced only for the stage's own matrix keys.
    pub(super) fn instance_table(
        &self,
        p: &Proto<'t>,
        combo: &[(String, Value<'t>)],
        own: &BTreeMap<String, String>,
        final_pass: bool,
    ) -> Result<DeTable<'t>> {
        let mut table = p.table.get_ref().clone();
        for (k, v) in combo {
            let span = p
                .matrix
                .iter()
                .find(|(mk, _, _)| mk == k)
                .map(|m| m.1.clone())
                .unwrap_or(0..0);
            table.insert(Spanned::new(span, Cow::Owned(k.clone())), v.clone());
        }
        if !final_pass {
            substitute_known(&mut table, own);
        }
        Ok(table)
    }

    /// Replaces `${key}` in every string of an expanded stage's table.
    pub(super) fn substitute(
        &self,
        p: &Proto<'t>,
        table: &mut DeTable<'t>,
        values: &BTreeMap<String, String>,
        ambiguous: &BTreeSet<String>,
    ) -> Result<()> {
        let mut stack: Vec<(String, &mut Value<'t>)> = Vec::new();
        for (k, v) in table.iter_mut() {
            stack.push((format!("stages.{}.{}", p.id, k.get_ref()), v));
        }
        while let Some((key, v)) = stack.pop() {
            let span = v.span();
            match v.get_mut() {
                DeValue::String(s) if s.contains("${") => {
                    let replaced = expand_placeholders(s, values, ambiguous)
                        .map_err(|m| self.src.err(span, &key, m))?;
                    *s = Cow::Owned(replaced);
                }
                DeValue::Array(a) => stack.extend(a.iter_mut().map(|e| (key.clone(), e))),
                DeValue::Table(t) => {
                    for (k, e) in t.iter_mut() {
                        stack.push((format!("{key}.{}", k.get_ref()), e));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn build(&self, p: &Proto<'t>, table: &DeTable<'t>) -> Result<Box<dyn Stage>> {
        let config = ConfigTable::new(Spanned::new(p.table.span(), table.clone()));
        self.build_config(p, &config)
    }

    pub(super) fn build_config(
        &self,
        p: &Proto<'t>,
        config: &ConfigTable<'t>,
    ) -> Result<Box<dyn Stage>> {
        (p.build)(config).map_err(|e| self.config_error(p, config, e))
    }

    pub(super) fn config_error(
        &self,
        p: &Proto<'t>,
        config: &ConfigTable<'t>,
        e: ConfigError,
    ) -> Error {
        let span = e.span.clone().unwrap_or(config.span());
        let key = match &e.key {
            Some(k) => format!("stages.{}.{k}", p.id),
            None => match key_at(config.table(), span.start) {
                Some(path) => format!("stages.{}.{path}", p.id),
                None => format!("stages.{}", p.id),
            },
        };
        self.src.err(span, &key, &e.message)
    }

    pub(super) fn topo_order(
        &self,
        protos: &[Proto<'t>],
        edges: &[(usize, usize, String, String)],
    ) -> Result<Vec<usize>> {
        let mut g: DiGraph<usize, usize> = DiGraph::new();
        let nodes: Vec<_> = (0..protos.len()).map(|i| g.add_node(i)).collect();
        for (ei, (from, to, _, _)) in edges.iter().enumerate() {
            g.add_edge(nodes[*from], nodes[*to], ei);
        }
        match petgraph::algo::toposort(&g, None) {
            Ok(order) => Ok(order.into_iter().map(|n| g[n]).collect()),
            Err(_) => {
                let cycle = crate::pipeline::cycle::find_cycle(&g).unwrap_or_default();
                let names: Vec<&str> = cycle.iter().map(|&n| protos[g[n]].id.as_str()).collect();
                // Report at the reference that closes the cycle.
                let first = cycle.first().map(|&n| g[n]).unwrap_or(0);
                let last = cycle.last().map(|&n| g[n]).unwrap_or(0);
                let (_, to, key, _) = edges
                    .iter()
                    .find(|(f, t, _, _)| *f == last && *t == first)
                    .or_else(|| edges.first())
                    .cloned()
                    .unwrap_or((0, 0, String::new(), String::new()));
                let p = &protos[to];
                let span = p
                    .table
                    .get_ref()
                    .get(key.as_str())
                    .map(|v| v.span())
                    .unwrap_or(p.table.span());
                let mut path = names.join(" → ");
                if let Some(f) = names.first() {
                    path.push_str(&format!(" → {f}"));
                }
                Err(self.src.err(
                    span,
                    &format!("stages.{}.{key}", p.id),
                    format!("dependency cycle: {path}"),
                ))
            }
        }
    }

    pub(super) fn output_path(
        &self,
        at: &Range<usize>,
        key: &str,
        path: &Path,
        out_dir: &Path,
        allow_outside: bool,
    ) -> Result<PathBuf> {
        if path.as_os_str().is_empty() {
            return Err(self.src.err(at.clone(), key, "the output path is empty"));
        }
        let escapes = path.is_absolute()
            || path.components().any(|c| {
                matches!(
                    c,
                    Component::ParentDir | Component::RootDir | Component::Prefix(_)
                )
            });
        if escapes && !allow_outside {
            return Err(self.src.err(
                at.clone(),
                key,
                format!(
                    "'{}' is outside out_dir (absolute or with '..'); set allow_outside_out_dir = true in [pipeline] to allow it",
                    fsutil::shorten(&path.display().to_string())
                ),
            ));
        }
        let mut resolved = out_dir.to_path_buf();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                other => resolved.push(other.as_os_str()),
            }
        }
        if resolved == out_dir {
            return Err(self
                .src
                .err(at.clone(), key, "the output path names out_dir itself"));
        }
        Ok(resolved)
    }
}
