//! `mole check-kernels`: compiles every registered kernel configuration for each architecture
//! with the ptxas resource report and fails on compile errors, spills, or a configuration that
//! does not fit the architecture (registers × threads, shared memory).

use mole::cuda::{self, Arch, Compiled, Output};
use mole::kernels::{all_candidates, KernelBuild};
use mole::MoleError;
use rayon::prelude::*;

#[derive(clap::Args)]
pub struct CheckKernelsArgs {
    /// Architectures to compile for, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_86,sm_89,sm_90")]
    arch: Vec<Arch>,
    /// Print every compiler log, not only the failing ones.
    #[arg(long)]
    verbose: bool,
}

/// One table row: an entry point of a build on an architecture.
struct Row {
    cells: Vec<String>,
    problems: Vec<String>,
}

fn defines_cell(build: &KernelBuild) -> String {
    let defines = build.config.defines();
    if defines.is_empty() {
        return "-".into();
    }
    defines.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(",")
}

/// The rows of one compiled (or failed) build.
fn rows_for(arch: Arch, build: &KernelBuild, result: &mole::Result<Compiled>) -> Vec<Row> {
    let head = |entry: &str| {
        vec![
            arch.to_string(),
            build.family().to_string(),
            build.dtype.to_string(),
            defines_cell(build),
            entry.to_string(),
        ]
    };
    let compiled = match result {
        Ok(c) => c,
        Err(e) => {
            let mut cells = head("*");
            cells.extend(["-", "-", "-", "-", "-", "FAIL"].map(String::from));
            let msg = match e {
                MoleError::NvrtcCompile { status, log, .. } => format!("compile error ({status}):\n{log}"),
                other => other.to_string(),
            };
            return vec![Row { cells, problems: vec![msg] }];
        }
    };
    let limits = arch.limits();
    // The launch the typed configuration declares (an invalid one did not compile: see above).
    let launch =
        build.config.validate(build.dtype).map(|()| (Some(build.block_threads()), build.dynamic_shared_bytes()));
    // Spills in non-inlined callees are charged to every entry of the build.
    let callee_spills: Vec<String> = compiled
        .functions
        .iter()
        .filter(|f| f.spill_stores > 0 || f.spill_loads > 0)
        .map(|f| format!("callee {} spills ({} B stored, {} B loaded)", f.name, f.spill_stores, f.spill_loads))
        .collect();
    build
        .entry_points()
        .iter()
        .map(|entry| {
            let mut cells = head(entry);
            let mut problems = callee_spills.clone();
            match (compiled.entry(entry), &launch) {
                (None, _) => {
                    cells.extend(["-", "-", "-", "-", "-"].map(String::from));
                    problems.push(format!("entry point `{entry}` is not in the cubin (missing extern \"C\"?)"));
                }
                (Some(_), Err(e)) => {
                    cells.extend(["-", "-", "-", "-", "-"].map(String::from));
                    problems.push(e.to_string());
                }
                (Some(r), Ok((threads, dynamic))) => {
                    cells.push(r.registers.to_string());
                    cells.push((r.shared_bytes + dynamic).to_string());
                    cells.push(r.stack_frame_bytes.to_string());
                    cells.push(format!("{}/{}", r.spill_stores, r.spill_loads));
                    let max = limits.max_threads_for_registers(r.registers);
                    cells.push(match threads {
                        Some(t) => format!("{t}/{max}"),
                        None => format!("-/{max}"),
                    });
                    problems.extend(limits.check(r, *threads, *dynamic).iter().map(|v| v.to_string()));
                }
            }
            cells.push(if problems.is_empty() { "ok" } else { "FAIL" }.to_string());
            Row { cells, problems }
        })
        .collect()
}

fn print_table(rows: &[&Row]) {
    let header =
        ["arch", "family", "dtype", "defines", "entry", "regs", "smem", "stack", "spill st/ld", "threads/max", "ok"];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(&row.cells) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells.zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.cells.iter().map(String::as_str));
    }
}

pub fn run(args: &CheckKernelsArgs) -> mole::Result<()> {
    let builds = all_candidates();
    if builds.is_empty() {
        println!("check-kernels: no kernel configurations are registered; nothing to check");
        return Ok(());
    }
    cuda::nvrtc_status()?;
    let (major, minor) = cuda::nvrtc_version()?;
    let archs: Vec<Arch> = args.arch.iter().copied().fold(Vec::new(), |mut v, a| {
        if !v.contains(&a) {
            v.push(a);
        }
        v
    });
    println!("check-kernels: {} configuration(s) x {} arch(es) with NVRTC {major}.{minor}", builds.len(), archs.len());
    let jobs: Vec<(Arch, &KernelBuild)> = archs.iter().flat_map(|&a| builds.iter().map(move |b| (a, b))).collect();
    // NVRTC is thread-safe; each job is an independent program.
    let results: Vec<mole::Result<Compiled>> = jobs
        .par_iter()
        .map(|&(arch, build)| build.unit().and_then(|u| cuda::compile(&u, arch, Output::Cubin, true)))
        .collect();

    let groups: Vec<Vec<Row>> =
        jobs.iter().zip(&results).map(|(&(arch, build), result)| rows_for(arch, build, result)).collect();
    print_table(&groups.iter().flatten().collect::<Vec<_>>());

    let mut failed = 0;
    for ((&(arch, build), result), rows) in jobs.iter().zip(&results).zip(&groups) {
        if rows.iter().any(|r| !r.problems.is_empty()) {
            failed += 1;
            println!("\nFAIL {build} on {arch}:");
            for row in rows {
                for p in &row.problems {
                    println!("  - {}: {}", row.cells[4], p.trim_end().replace('\n', "\n    "));
                }
            }
        }
        if args.verbose {
            if let Ok(c) = result {
                println!("\n--- log: {build} on {arch}\n{}", c.log.trim_end());
            }
        }
    }
    if failed > 0 {
        return Err(MoleError::GateFailed {
            gate: "check-kernels",
            detail: format!("{failed} of {} compilations have problems (listed above)", jobs.len()),
        });
    }
    println!("check-kernels: all {} compilations ok", jobs.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mole::cuda::{EntryResources, FunctionFrame};
    use mole::kernels::gating;
    use mole::DType;

    /// A gating build: its dynamic shared memory is one word per expert (1024) per warp.
    fn build(threads: u32) -> KernelBuild {
        gating::build(DType::F16, threads)
    }

    fn compiled(entries: Vec<EntryResources>) -> Compiled {
        Compiled { image: vec![1], log: String::new(), resources: entries, functions: vec![], options: vec![] }
    }

    fn res(entry: &str, registers: u32) -> EntryResources {
        EntryResources { entry: entry.into(), registers, ..Default::default() }
    }

    /// A record of every entry point of `b`, each with `registers` registers.
    fn all(b: &KernelBuild, registers: u32) -> Vec<EntryResources> {
        b.entry_points().iter().map(|e| res(e, registers)).collect()
    }

    fn verdicts(rows: &[Row]) -> Vec<&str> {
        rows.iter().map(|r| r.cells.last().unwrap().as_str()).collect()
    }

    fn oks(n: usize) -> Vec<&'static str> {
        vec!["ok"; n]
    }

    #[test]
    fn clean_build_passes() {
        let b = build(256);
        let rows = rows_for(Arch::Sm90, &b, &Ok(compiled(all(&b, 40))));
        assert_eq!(verdicts(&rows), oks(b.entry_points().len()));
        assert_eq!(rows[0].cells[3], "MOLE_BLOCK_THREADS=256,MOLE_DYNAMIC_SMEM_BYTES=32768");
        assert_eq!(rows[0].cells[5], "40");
        // Static (0) plus the declared dynamic shared memory.
        assert_eq!(rows[0].cells[6], "32768");
        assert_eq!(rows[1].cells[9], "256/1024");
    }

    #[test]
    fn spills_limits_missing_entries_and_errors_fail() {
        let b = build(128);
        let n = b.entry_points().len();
        let mut spill = all(&b, 32);
        spill[0] = EntryResources { spill_stores: 8, spill_loads: 8, ..res(&b.entry_points()[0], 32) };
        let rows = rows_for(Arch::Sm90, &b, &Ok(compiled(spill)));
        assert_eq!(verdicts(&rows)[..2], ["FAIL", "ok"]);
        // 128 registers x 1024 threads does not fit the register file.
        let big = build(1024);
        let mut regs = all(&big, 32);
        regs[0].registers = 128;
        let rows = rows_for(Arch::Sm80, &big, &Ok(compiled(regs)));
        assert_eq!(verdicts(&rows)[..2], ["FAIL", "ok"]);
        // The declared dynamic shared memory counts against the limit: 800 threads declare
        // 25 warps x 4 KiB = 100 KiB, which fits sm_80 but not sm_86.
        let smem = build(800);
        let ok = Ok(compiled(all(&smem, 32)));
        assert_eq!(verdicts(&rows_for(Arch::Sm80, &smem, &ok)), oks(n));
        assert_eq!(verdicts(&rows_for(Arch::Sm86, &smem, &ok)), vec!["FAIL"; n]);
        // An entry point the cubin lacks.
        let rows = rows_for(Arch::Sm90, &b, &Ok(compiled(all(&b, 32)[1..].to_vec())));
        assert_eq!(verdicts(&rows)[..2], ["FAIL", "ok"]);
        // A spilling callee fails every entry of the build.
        let mut c = compiled(all(&b, 32));
        c.functions.push(FunctionFrame { name: "_Z1fv".into(), spill_stores: 4, ..Default::default() });
        assert_eq!(verdicts(&rows_for(Arch::Sm90, &b, &Ok(c))), vec!["FAIL"; n]);
        // A compile error is one failing row carrying the log.
        let err = MoleError::NvrtcCompile { what: "x".into(), status: "S".into(), log: "bad line".into() };
        let rows = rows_for(Arch::Sm90, &b, &Err(err));
        assert_eq!(verdicts(&rows), ["FAIL"]);
        assert!(rows[0].problems[0].contains("bad line"));
        // An invalid configuration is reported on every entry, not a panic.
        let rows = rows_for(Arch::Sm90, &build(100), &Ok(compiled(all(&build(100), 32))));
        assert_eq!(verdicts(&rows), vec!["FAIL"; n]);
    }
}
