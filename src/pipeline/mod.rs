//! Recipes, the stage DAG, fingerprints and the artifact cache, and explanations of freshness.
