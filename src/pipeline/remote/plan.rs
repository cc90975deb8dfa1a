//! `qpipe plan` and the stage selections of `run --shard K/N` and `run --only ID…`.
//!
//! # Variants, the unit of a shard
//!
//! The stages nothing reads (exports, validations) are what a recipe is run for. Each
//! is about one model: the input it reads that lies deepest in the graph (the candidate
//! of a `validate`, the model of an export; ties go to the later stage). Those that are
//! about the same stage form one *variant*, named after that stage: `int8@DEFAULT` is
//! its export and its validation. Variants are listed in recipe order, and shard `K` of
//! `N` builds variants `K, K+N, K+2N, …` (counting from 1) with everything upstream of
//! them, which the remote usually has already. So every shard is deterministic, the
//! shards together build every stage, and a variant's stages never straddle two shards.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::sync::pull;
use super::Remote;
use crate::error::{Error, Result};
use crate::pipeline::dag::Dag;
use crate::pipeline::recipe::Recipe;

/// A variant: the stage it is about, and the final stages that make it.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub subject: usize,
    pub sinks: Vec<usize>,
}

/// The recipe's variants, in recipe order of their subject stages.
pub fn variants(recipe: &Recipe) -> Vec<Variant> {
    let dag = Dag::new(recipe);
    let order = dag.topo_order().unwrap_or_default();
    let mut depth = vec![0usize; recipe.stages.len()];
    for &i in &order {
        depth[i] = dag
            .upstream(i)
            .iter()
            .map(|u| depth[*u] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut by_subject: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..recipe.stages.len() {
        if !dag.dependents(i).is_empty() {
            continue;
        }
        let subject = dag
            .upstream(i)
            .into_iter()
            .max_by_key(|u| (depth[*u], *u))
            .unwrap_or(i);
        by_subject.entry(subject).or_default().push(i);
    }
    by_subject
        .into_iter()
        .map(|(subject, sinks)| Variant { subject, sinks })
        .collect()
}

/// `s` and every stage upstream of it.
fn with_upstream(dag: &Dag, s: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<usize> = s.into_iter().collect();
    while let Some(i) = stack.pop() {
        if seen.insert(i) {
            stack.extend(dag.upstream(i));
        }
    }
    seen
}

/// Parses `K/N` (1 ≤ K ≤ N).
pub fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("'{s}': a shard is K/N with 1 <= K <= N, e.g. 2/4");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let k: usize = k.trim().parse().map_err(|_| bad())?;
    let n: usize = n.trim().parse().map_err(|_| bad())?;
    if k == 0 || n == 0 || k > n || n > 100_000 {
        return Err(bad());
    }
    Ok((k, n))
}

/// The stages a run builds: `None` for all; with `shard = (K, N)` shard K's variants,
/// with `only` the named stages (an id, or a stage name before matrix expansion for all
/// its variants); in both cases with everything upstream.
pub fn select_stages(
    recipe: &Recipe,
    shard: Option<(usize, usize)>,
    only: &[String],
) -> Result<Option<BTreeSet<usize>>> {
    let dag = Dag::new(recipe);
    if let Some((k, n)) = shard {
        let picked = variants(recipe)
            .into_iter()
            .enumerate()
            .filter(|(pos, _)| pos % n == k - 1)
            .flat_map(|(_, v)| v.sinks);
        return Ok(Some(with_upstream(&dag, picked)));
    }
    if only.is_empty() {
        return Ok(None);
    }
    let mut named = Vec::new();
    for id in only {
        let hits: Vec<usize> = recipe
            .stages
            .iter()
            .enumerate()
            .filter(|(_, s)| &s.id == id || &s.base_id == id)
            .map(|(i, _)| i)
            .collect();
        if hits.is_empty() {
            let ids: Vec<&str> = recipe.stages.iter().map(|s| s.id.as_str()).collect();
            return Err(Error::usage(format!(
                "{}: --only: no stage '{id}' (stages: {})",
                recipe.path.display(),
                ids.join(", ")
            )));
        }
        named.extend(hits);
    }
    Ok(Some(with_upstream(&dag, named)))
}

/// What `qpipe plan --json` prints.
pub struct Plan {
    pub doc: Value,
}

/// The stages, their dependencies and variants, and every key that can be known
/// without building: a stage's key needs its upstream artifacts' hashes, which the
/// local cache or the remote's `/ac` entries give. Downloads no blob.
pub fn plan(recipe: &Recipe, remote: Option<&Remote>, warn: &dyn Fn(&str)) -> Result<Plan> {
    let resolved = pull(recipe, remote, false, warn)?;
    let dag = Dag::new(recipe);
    let ids = |v: Vec<usize>| -> Vec<&str> {
        v.into_iter()
            .map(|i| recipe.stages[i].id.as_str())
            .collect()
    };
    let stages: Vec<Value> = recipe
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let r = &resolved.stages[i];
            json!({
                "id": s.id,
                "kind": s.kind,
                "base_id": s.base_id,
                "variant": s.variant,
                "deps": ids(dag.upstream(i)),
                "key": r.key,
                "cached": r.cached.map(|c| c.as_str()),
            })
        })
        .collect();
    let variants: Vec<Value> = variants(recipe)
        .into_iter()
        .map(|v| {
            let all = with_upstream(&dag, v.sinks.iter().copied());
            let todo = all
                .iter()
                .filter(|i| resolved.stages[**i].cached.is_none())
                .count();
            json!({
                "id": recipe.stages[v.subject].id,
                "stages": ids(v.sinks),
                "uncached_stages": todo,
            })
        })
        .collect();
    let n = variants.len();
    Ok(Plan {
        doc: json!({
            "pipeline": recipe.name,
            "remote_cache": remote.map(|r| r.settings.url.clone()),
            "stages": stages,
            "variants": variants,
            "shards": (1..=n.max(1)).map(|k| format!("{k}/{}", n.max(1))).collect::<Vec<_>>(),
        }),
    })
}

impl Plan {
    /// A short table for a terminal.
    pub fn render(&self) -> String {
        let mut rows = vec![vec![
            "STAGE".to_string(),
            "DEPS".into(),
            "KEY".into(),
            "CACHED".into(),
        ]];
        for s in self.doc["stages"].as_array().into_iter().flatten() {
            let deps: Vec<&str> = s["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str())
                .collect();
            rows.push(vec![
                s["id"].as_str().unwrap_or("").to_string(),
                if deps.is_empty() {
                    "-".into()
                } else {
                    deps.join(",")
                },
                s["key"]
                    .as_str()
                    .map(|k| crate::pipeline::store::short(k).to_string())
                    .unwrap_or_else(|| "(needs upstream)".into()),
                s["cached"].as_str().unwrap_or("no").to_string(),
            ]);
        }
        let mut out = crate::pipeline::report::table(&rows);
        for v in self.doc["variants"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "variant {}: {}\n",
                v["id"].as_str().unwrap_or(""),
                v["stages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out
    }
}
