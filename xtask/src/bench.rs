//! The benchmark matrix run (`bench-all`) and the merge of shard results
//! (`bench-merge`): plan the cells, skip the finished ones, run the rest one
//! after another with progress and ETA, store each result atomically, and
//! render the report.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::plan::{shard_cells, Cell, Shard};
use crate::report;
use crate::results::{
    self, cell_json_path, cell_run_dir, check_stored, CellResult, RunSettings, StoredCell,
    CELL_SCHEMA,
};
use crate::runner::{CellJob, CellRunner};

/// A fully resolved `bench-all` run.
#[derive(Debug, Clone)]
pub struct MatrixRun {
    /// The whole matrix, sorted (every shard computes the same list).
    pub matrix: Vec<Cell>,
    pub shard: Shard,
    /// Results directory: `<backbone>/<category>.json`, `runs/`, the report.
    pub out: PathBuf,
    /// Dataset root passed to `fastflow train --data`.
    pub data_root: PathBuf,
    /// How the data is named in cell files and the report (`synthetic` or the
    /// root as given).
    pub data_label: String,
    /// Config file per backbone (`configs/<backbone>.yaml` or a derived one).
    pub configs: Vec<(String, PathBuf)>,
    pub settings: RunSettings,
}

/// What a run did, for the final message and the exit code.
#[derive(Debug, Default)]
pub struct MatrixOutcome {
    pub ran: Vec<Cell>,
    pub skipped: Vec<Cell>,
    pub failed: Vec<(Cell, String)>,
}

impl MatrixRun {
    fn config_for(&self, backbone: &str) -> anyhow::Result<&Path> {
        self.configs
            .iter()
            .find(|(b, _)| b == backbone)
            .map(|(_, p)| p.as_path())
            .with_context(|| format!("no config for backbone {backbone}"))
    }
}

/// Formats seconds as `h:mm:ss`.
pub fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Runs this shard's cells of the matrix, skipping finished ones, and writes
/// the report over whatever cells of the matrix are finished in `out`. A
/// failing cell does not stop the others; the outcome lists it.
pub fn run_matrix(run: &MatrixRun, runner: &mut dyn CellRunner) -> anyhow::Result<MatrixOutcome> {
    fs::create_dir_all(&run.out).with_context(|| format!("cannot create {}", run.out.display()))?;
    let mine = shard_cells(&run.matrix, run.shard);
    let n = mine.len();
    eprintln!(
        "bench: {} of the matrix's {} cells in shard {} (epochs {}, weights {}, data {})",
        n,
        run.matrix.len(),
        run.shard,
        run.settings.epochs,
        run.settings.weights,
        run.data_label
    );
    let started = Instant::now();
    let mut outcome = MatrixOutcome::default();
    // Only cells actually run this time count for the ETA: skipped ones are
    // instant and would make it far too optimistic.
    let mut run_time = Duration::ZERO;
    for (i, cell) in mine.iter().enumerate() {
        let k = i + 1;
        match check_stored(&run.out, cell, &run.settings, &run.data_label) {
            StoredCell::Finished(r) => {
                eprintln!(
                    "[cell {k}/{n}] {cell}: finished earlier (image AUROC {:.1}), skipped",
                    100.0 * r.metrics.image_auroc
                );
                outcome.skipped.push(cell.clone());
                continue;
            }
            StoredCell::Redo(why) => eprintln!("[cell {k}/{n}] {cell}: running again: {why}"),
            StoredCell::Missing => {}
        }
        let remaining = (n - i) as u32;
        let eta = if outcome.ran.len() + outcome.failed.len() > 0 {
            let per_cell = run_time / (outcome.ran.len() + outcome.failed.len()) as u32;
            hms(per_cell * remaining)
        } else {
            "unknown".into()
        };
        eprintln!(
            "[cell {k}/{n}] {cell}: training (elapsed {}, ETA {eta})",
            hms(started.elapsed())
        );
        let t0 = Instant::now();
        let result = run_one(run, runner, cell);
        run_time += t0.elapsed();
        match result {
            Ok(r) => {
                eprintln!(
                    "[cell {k}/{n}] {cell}: image AUROC {:.1}, pixel AUROC {:.1}, AU-PRO {:.1}, \
                     {:.0} s (elapsed {})",
                    100.0 * r.metrics.image_auroc,
                    100.0 * r.metrics.pixel_auroc,
                    100.0 * r.metrics.aupro,
                    r.metrics.train_seconds,
                    hms(started.elapsed())
                );
                outcome.ran.push(cell.clone());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("[cell {k}/{n}] {cell}: FAILED: {msg}");
                outcome.failed.push((cell.clone(), msg));
            }
        }
    }
    write_report(&run.out, &run.matrix)?;
    Ok(outcome)
}

fn run_one(
    run: &MatrixRun,
    runner: &mut dyn CellRunner,
    cell: &Cell,
) -> anyhow::Result<CellResult> {
    let run_dir = cell_run_dir(&run.out, cell);
    let job = CellJob {
        cell: cell.clone(),
        config: run.config_for(&cell.backbone)?.to_path_buf(),
        data: run.data_root.clone(),
        metrics_json: run_dir.join("metrics.json"),
        run_dir,
        settings: run.settings.clone(),
    };
    let out = runner.run_cell(&job)?;
    let result = CellResult {
        schema: CELL_SCHEMA,
        backbone: cell.backbone.clone(),
        category: cell.category.clone(),
        data: run.data_label.clone(),
        settings: run.settings.clone(),
        metrics: out.metrics,
        fastflow_json: out.raw,
    };
    results::write_cell(&run.out, &result)?;
    Ok(result)
}

/// Renders the report over `matrix` from the finished cells in `out` that
/// belong to it.
fn write_report(out: &Path, matrix: &[Cell]) -> anyhow::Result<()> {
    let wanted: BTreeSet<&Cell> = matrix.iter().collect();
    let found: Vec<CellResult> = results::collect_cells(out)?
        .into_iter()
        .filter(|r| wanted.contains(&r.cell()))
        .collect();
    report::write(out, &report::build(matrix, &found))?;
    eprintln!(
        "report: {} and {} ({} of {} cells finished)",
        out.join("report.md").display(),
        out.join(results::SUMMARY_FILE).display(),
        found.len(),
        matrix.len()
    );
    Ok(())
}

/// Combines the results directories of several shards into `out`: copies
/// every cell file, and renders one report over the union of the shards'
/// matrices. The same cell in two inputs must hold the same result.
pub fn merge(inputs: &[PathBuf], out: &Path) -> anyhow::Result<usize> {
    if inputs.is_empty() {
        bail!("no input directories given");
    }
    let mut matrix: BTreeSet<Cell> = BTreeSet::new();
    let mut cells: Vec<(CellResult, PathBuf)> = Vec::new();
    for dir in inputs {
        if !dir.is_dir() {
            bail!("{} is not a results directory", dir.display());
        }
        matrix.extend(report::read_matrix(dir)?);
        for r in results::collect_cells(dir)? {
            let path = cell_json_path(dir, &r.cell());
            match cells.iter().find(|(c, _)| c.cell() == r.cell()) {
                Some((c, other)) if *c != r => bail!(
                    "{} appears in two inputs with different results: {} and {}",
                    r.cell(),
                    other.display(),
                    path.display()
                ),
                Some(_) => {}
                None => cells.push((r, path)),
            }
        }
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (r, src) in &cells {
        let dest = cell_json_path(out, &r.cell());
        // Merging into one of the inputs is allowed: a file already there
        // holds the same result (checked above) unless it is broken.
        if let Ok(existing) = results::read_cell(&dest) {
            if existing == *r {
                continue;
            }
        }
        // The shard's bytes are copied as they are: serde_json's float
        // parsing does not always round-trip the last digit, so writing the
        // parsed value again could differ from what a full run writes.
        let bytes = fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
        results::write_atomic(&dest, &bytes)?;
    }
    matrix.extend(cells.iter().map(|(r, _)| r.cell()));
    let matrix: Vec<Cell> = matrix.into_iter().collect();
    write_report(out, &matrix)?;
    Ok(cells.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::results::CellMetrics;
    use crate::runner::CellOutput;

    /// A runner whose metrics are a pure function of the cell, and which
    /// records what it was asked to run.
    #[derive(Default)]
    struct FakeRunner {
        calls: Vec<Cell>,
        fail: Option<Cell>,
    }

    impl CellRunner for FakeRunner {
        fn run_cell(&mut self, job: &CellJob) -> anyhow::Result<CellOutput> {
            self.calls.push(job.cell.clone());
            if self.fail.as_ref() == Some(&job.cell) {
                bail!("simulated crash in {}", job.cell);
            }
            assert!(job.config.ends_with(format!("{}.yaml", job.cell.backbone)));
            let h = job
                .cell
                .to_string()
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let x = (h % 1000) as f64 / 10_000.0;
            Ok(CellOutput {
                metrics: CellMetrics {
                    image_auroc: 0.9 + x,
                    pixel_auroc: 0.95 + x / 2.0,
                    aupro: 0.85 + x,
                    image_f1_max: Some(0.9),
                    inference_img_per_s: Some(10.0 + x),
                    n_images: Some(20),
                    train_seconds: 3.0 + x,
                    wall_seconds: 4.0 + x,
                    resumed: false,
                },
                raw: serde_json::json!({ "image_auroc": 0.9 + x }),
            })
        }
    }

    fn matrix_run(out: &Path, shard: Shard) -> MatrixRun {
        let backbones: Vec<String> = ["resnet18", "wide_resnet50_2"].map(String::from).to_vec();
        let categories: Vec<String> = ["bottle", "cable", "grid"].map(String::from).to_vec();
        MatrixRun {
            matrix: plan(&backbones, &categories).unwrap(),
            shard,
            out: out.to_path_buf(),
            data_root: "data/synthetic".into(),
            data_label: "synthetic".into(),
            configs: backbones
                .iter()
                .map(|b| (b.clone(), PathBuf::from(format!("configs/{b}.yaml"))))
                .collect(),
            settings: crate::results::tests::settings(),
        }
    }

    fn read(p: PathBuf) -> String {
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn durations_print_as_hours_minutes_seconds() {
        assert_eq!(hms(Duration::from_secs(0)), "0:00:00");
        assert_eq!(hms(Duration::from_secs(3 * 3600 + 7 * 60 + 9)), "3:07:09");
        assert_eq!(hms(Duration::from_secs(100 * 3600)), "100:00:00");
    }

    #[test]
    fn a_rerun_skips_finished_cells_and_redoes_failed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let run = matrix_run(dir.path(), Shard::FULL);
        let crash = Cell {
            backbone: "resnet18".into(),
            category: "cable".into(),
        };
        let mut first = FakeRunner {
            fail: Some(crash.clone()),
            ..Default::default()
        };
        let o = run_matrix(&run, &mut first).unwrap();
        assert_eq!(first.calls.len(), 6);
        assert_eq!(o.ran.len(), 5);
        assert_eq!(o.failed.len(), 1);
        assert!(o.failed[0].1.contains("simulated crash"));
        assert!(!cell_json_path(dir.path(), &crash).exists());
        let md = read(dir.path().join("report.md"));
        assert!(md.contains("Cells finished: 5 of 6."), "{md}");
        assert!(
            md.contains("Missing cells (shown as —): resnet18/cable."),
            "{md}"
        );

        // The rerun runs only the cell that did not finish.
        let mut second = FakeRunner::default();
        let o = run_matrix(&run, &mut second).unwrap();
        assert_eq!(second.calls, vec![crash]);
        assert_eq!((o.ran.len(), o.skipped.len(), o.failed.len()), (1, 5, 0));
        let md = read(dir.path().join("report.md"));
        assert!(md.contains("Cells finished: 6 of 6."), "{md}");

        // A third run has nothing left to do; new settings redo everything.
        let mut third = FakeRunner::default();
        run_matrix(&run, &mut third).unwrap();
        assert!(third.calls.is_empty());
        let mut longer = run.clone();
        longer.settings.epochs += 1;
        let mut fourth = FakeRunner::default();
        run_matrix(&longer, &mut fourth).unwrap();
        assert_eq!(fourth.calls.len(), 6);
    }

    #[test]
    fn two_shards_merged_equal_one_full_run() {
        let full = tempfile::tempdir().unwrap();
        let s0 = tempfile::tempdir().unwrap();
        let s1 = tempfile::tempdir().unwrap();
        let merged = tempfile::tempdir().unwrap();

        let mut r = FakeRunner::default();
        run_matrix(&matrix_run(full.path(), Shard::FULL), &mut r).unwrap();
        let mut r0 = FakeRunner::default();
        run_matrix(
            &matrix_run(s0.path(), Shard { index: 0, count: 2 }),
            &mut r0,
        )
        .unwrap();
        let mut r1 = FakeRunner::default();
        run_matrix(
            &matrix_run(s1.path(), Shard { index: 1, count: 2 }),
            &mut r1,
        )
        .unwrap();
        // The shards split the work without overlap.
        assert_eq!((r0.calls.len(), r1.calls.len()), (3, 3));
        assert!(r0.calls.iter().all(|c| !r1.calls.contains(c)));
        // A shard's own report knows the whole matrix and what it lacks.
        let md0 = read(s0.path().join("report.md"));
        assert!(md0.contains("Cells finished: 3 of 6."), "{md0}");

        let n = merge(
            &[s0.path().to_path_buf(), s1.path().to_path_buf()],
            merged.path(),
        )
        .unwrap();
        assert_eq!(n, 6);
        assert_eq!(
            read(merged.path().join("report.md")),
            read(full.path().join("report.md"))
        );
        assert_eq!(
            read(merged.path().join("summary.json")),
            read(full.path().join("summary.json"))
        );
        for cell in &matrix_run(full.path(), Shard::FULL).matrix {
            assert_eq!(
                read(cell_json_path(merged.path(), cell)),
                read(cell_json_path(full.path(), cell))
            );
        }
        // Rerunning the full matrix in the merged directory has nothing to do.
        let mut again = FakeRunner::default();
        run_matrix(&matrix_run(merged.path(), Shard::FULL), &mut again).unwrap();
        assert!(again.calls.is_empty());
    }

    /// The layout bench_slurm.sbatch documents: shards in `results/shard-<i>`,
    /// merged into `results` itself. The shard folders are not backbones.
    #[test]
    fn shards_merged_into_their_parent_folder_equal_one_full_run() {
        let full = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        let mut r = FakeRunner::default();
        run_matrix(&matrix_run(full.path(), Shard::FULL), &mut r).unwrap();
        let shards: Vec<PathBuf> = (0..2)
            .map(|i| results.path().join(format!("shard-{i}")))
            .collect();
        for (i, dir) in shards.iter().enumerate() {
            let shard = Shard { index: i, count: 2 };
            run_matrix(&matrix_run(dir, shard), &mut FakeRunner::default()).unwrap();
        }
        assert_eq!(merge(&shards, results.path()).unwrap(), 6);
        assert_eq!(
            read(results.path().join("summary.json")),
            read(full.path().join("summary.json"))
        );
        // Merging again (a resubmitted merge job) changes nothing.
        assert_eq!(merge(&shards, results.path()).unwrap(), 6);
        assert_eq!(
            read(results.path().join("report.md")),
            read(full.path().join("report.md"))
        );
    }

    #[test]
    fn a_merge_with_a_missing_shard_reports_the_missing_cells() {
        let s0 = tempfile::tempdir().unwrap();
        let merged = tempfile::tempdir().unwrap();
        let mut r0 = FakeRunner::default();
        run_matrix(
            &matrix_run(s0.path(), Shard { index: 0, count: 2 }),
            &mut r0,
        )
        .unwrap();
        merge(&[s0.path().to_path_buf()], merged.path()).unwrap();
        let md = read(merged.path().join("report.md"));
        assert!(md.contains("Cells finished: 3 of 6."), "{md}");
    }

    #[test]
    fn conflicting_results_for_one_cell_are_an_error() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let merged = tempfile::tempdir().unwrap();
        results::write_cell(
            a.path(),
            &crate::results::tests::fake_result("resnet18", "bottle", 0.01),
        )
        .unwrap();
        results::write_cell(
            b.path(),
            &crate::results::tests::fake_result("resnet18", "bottle", 0.02),
        )
        .unwrap();
        let err = format!(
            "{:#}",
            merge(
                &[a.path().to_path_buf(), b.path().to_path_buf()],
                merged.path()
            )
            .unwrap_err()
        );
        assert!(
            err.contains("resnet18/bottle") && err.contains("different results"),
            "{err}"
        );
        assert!(merge(&[a.path().join("nope")], merged.path()).is_err());
    }
}
