//! Criterion profile of the grouped (SGMV) forward at the standard shapes (the square projection
//! at r = 16; `mole bench grouped --all` covers the full grid). Times come from CUDA events.
//! Without a GPU it prints why and measures nothing.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mole::bench::{GroupedCase, GroupedRun};
use mole::cuda::{time_on_device, Device};
use std::time::Duration;

fn grouped(c: &mut Criterion) {
    let device = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("benches/grouped: no usable GPU ({e}); nothing measured");
            return;
        }
    };
    let mut group = c.benchmark_group(format!("grouped_bf16/{}", device.name()));
    for case in GroupedCase::standard(false) {
        let mut run = match GroupedRun::<half::bf16>::new(&device, &case) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping {case:?}: {e}");
                continue;
            }
        };
        group.throughput(Throughput::Bytes(case.bytes(mole::DType::BF16, run.touched_experts()) as u64));
        let id = format!("d{}x{}_r{}_E{}_k{}", case.d_in, case.d_out, case.rank, case.experts, case.k);
        group.bench_function(BenchmarkId::new(id, case.tokens), |b| {
            b.iter_custom(|iters| {
                let t = time_on_device(&device, 1, iters.max(1) as usize, || run.forward())
                    .unwrap_or_else(|e| panic!("{case:?}: {e}"));
                Duration::from_secs_f64(t.samples_ms.iter().sum::<f64>() * 1e-3)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, grouped);
criterion_main!(benches);
