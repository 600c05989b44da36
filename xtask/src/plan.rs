//! The benchmark matrix: which (backbone, category) cells exist, their one
//! canonical order, and which shard of a `--shard i/n` run owns which cell.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The paper's four backbones, in the order its tables list them. Each name is
/// also the stem of its config file under `configs/`.
pub const PAPER_BACKBONES: [&str; 4] = ["resnet18", "wide_resnet50_2", "deit", "cait"];

/// Folder names of a results directory that are not backbones.
pub const RESERVED: [&str; 3] = ["runs", "data", "configs"];

/// One cell of the matrix: one backbone trained and evaluated on one category.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cell {
    pub backbone: String,
    pub category: String,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.backbone, self.category)
    }
}

/// A deterministic slice of the matrix: cell `k` of the sorted cell list
/// belongs to shard `k mod count`. Indices start at 0 so that a Slurm array
/// `--array=0-(n-1)` can pass `$SLURM_ARRAY_TASK_ID` straight through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The shard that owns every cell (no `--shard` given).
    pub const FULL: Shard = Shard { index: 0, count: 1 };

    /// Whether cell number `k` of the sorted list belongs to this shard.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("shard {s:?} is not of the form i/n (e.g. 0/4)"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("shard index {i:?} in {s:?} is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("shard count {n:?} in {s:?} is not a number"))?;
        if count == 0 {
            bail!("shard {s:?}: the shard count must be at least 1");
        }
        if index >= count {
            bail!("shard {s:?}: the index must be in 0..{count} (shards are numbered from 0)");
        }
        Ok(Shard { index, count })
    }
}

/// Checks that a backbone or category name is safe to use as one path
/// component, because each becomes a folder and a file name under the results
/// directory.
pub fn check_name(kind: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !ok {
        bail!("{kind} name {name:?} must be non-empty, not start with '.', and use only letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

/// The full matrix as one sorted, duplicate-free list of cells: sorted by
/// backbone, then category, so that every shard of a run computes the same
/// list from the same arguments.
pub fn plan(backbones: &[String], categories: &[String]) -> anyhow::Result<Vec<Cell>> {
    if backbones.is_empty() {
        bail!("no backbones given");
    }
    if categories.is_empty() {
        bail!("no categories given");
    }
    for b in backbones {
        check_name("backbone", b)?;
        // These folders of a results directory hold runs, generated data and
        // derived configs, not a backbone's cell files.
        if RESERVED.contains(&b.as_str()) {
            bail!("{b:?} cannot be a backbone name: the results directory uses that folder");
        }
    }
    for c in categories {
        check_name("category", c)?;
    }
    let mut cells: Vec<Cell> = backbones
        .iter()
        .flat_map(|b| {
            categories.iter().map(move |c| Cell {
                backbone: b.clone(),
                category: c.clone(),
            })
        })
        .collect();
    cells.sort();
    cells.dedup();
    Ok(cells)
}

/// The cells of `cells` (already sorted by [`plan`]) that `shard` runs.
pub fn shard_cells(cells: &[Cell], shard: Shard) -> Vec<Cell> {
    cells
        .iter()
        .enumerate()
        .filter(|(k, _)| shard.owns(*k))
        .map(|(_, c)| c.clone())
        .collect()
}

/// Sort key that lists the paper's backbones in the paper's order and any
/// other backbone after them, alphabetically; used for report columns.
pub fn backbone_rank(name: &str) -> (usize, String) {
    let rank = PAPER_BACKBONES
        .iter()
        .position(|b| *b == name)
        .unwrap_or(PAPER_BACKBONES.len());
    (rank, name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plan_is_sorted_and_deduplicated() {
        let cells = plan(
            &names(&["wide_resnet50_2", "resnet18", "resnet18"]),
            &names(&["zipper", "bottle"]),
        )
        .unwrap();
        let ids: Vec<String> = cells.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            ids,
            [
                "resnet18/bottle",
                "resnet18/zipper",
                "wide_resnet50_2/bottle",
                "wide_resnet50_2/zipper"
            ]
        );
    }

    #[test]
    fn plan_rejects_unsafe_names_and_empty_lists() {
        assert!(plan(&names(&["../x"]), &names(&["bottle"])).is_err());
        assert!(plan(&names(&["resnet18"]), &names(&["a/b"])).is_err());
        assert!(plan(&names(&["resnet18"]), &names(&[".hidden"])).is_err());
        assert!(plan(&names(&["runs"]), &names(&["bottle"])).is_err());
        assert!(plan(&[], &names(&["bottle"])).is_err());
        assert!(plan(&names(&["resnet18"]), &[]).is_err());
    }

    #[test]
    fn shards_partition_the_matrix_round_robin() {
        let cells = plan(
            &names(&["resnet18", "wide_resnet50_2", "deit"]),
            &names(&["bottle", "cable", "grid", "screw", "wood"]),
        )
        .unwrap();
        let n = 4;
        let shards: Vec<Vec<Cell>> = (0..n)
            .map(|i| shard_cells(&cells, Shard { index: i, count: n }))
            .collect();
        // Every cell lands in exactly one shard, and cell k in shard k mod n.
        let mut all: Vec<Cell> = shards.iter().flatten().cloned().collect();
        all.sort();
        assert_eq!(all, cells);
        for (k, cell) in cells.iter().enumerate() {
            assert!(shards[k % n].contains(cell));
        }
        // Sizes differ by at most one.
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 4, 4, 3]);
        assert_eq!(shard_cells(&cells, Shard::FULL), cells);
    }

    #[test]
    fn shard_parsing() {
        assert_eq!(
            "2/5".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 5 }
        );
        for bad in ["5/5", "1/0", "x/2", "1", "-1/2", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn backbone_rank_follows_the_paper() {
        let mut b = names(&[
            "zeta",
            "cait",
            "resnet18",
            "deit",
            "wide_resnet50_2",
            "alpha",
        ]);
        b.sort_by_key(|n| backbone_rank(n));
        assert_eq!(
            b,
            names(&[
                "resnet18",
                "wide_resnet50_2",
                "deit",
                "cait",
                "alpha",
                "zeta"
            ])
        );
    }
}
