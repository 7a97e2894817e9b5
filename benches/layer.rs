//! Criterion profile of whole layers (`mole::layer`) for the standard methods at d = 4096, through
//! the strategy the library chooses (tuning cache, else heuristic). Times come from CUDA events.
//! `mole bench layer` adds bandwidth, the fraction of the measured copy bandwidth and the ratio to
//! the grouped path. Without a GPU it prints why and measures nothing.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mole::autotune::DeviceLayer;
use mole::cuda::{time_on_device, Device};
use mole::model::MethodShape;
use mole::model::STANDARD_METHODS;
use mole::runtime::choose;
use mole::synth::SyntheticLayer;
use mole::tune::{GpuId, TuningCache};
use mole::DType;
use std::time::Duration;

fn layers(c: &mut Criterion) {
    let device = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("benches/layer: no usable GPU ({e}); nothing measured");
            return;
        }
    };
    let (cache, _) = TuningCache::load_for(&GpuId::of_device(&device));
    let mut group = c.benchmark_group(format!("layer_bf16/{}", device.name()));
    for (method, experts, rank, k) in STANDARD_METHODS {
        let shape = MethodShape { d_in: 4096, d_out: 4096, experts, rank, k, alpha: 2.0 * rank as f64 };
        let Ok(spec) = method.spec(shape) else { continue };
        for tokens in [1, 16, 256, 4096, 16384] {
            let prepared = choose(&spec, DType::BF16, tokens, device.sm_count(), Some(&cache)).and_then(|choice| {
                DeviceLayer::new(&device, &spec, SyntheticLayer::<half::bf16>::new(&spec, tokens, 7), choice)
            });
            let mut layer = match prepared {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("skipping {method} T={tokens}: {e}");
                    continue;
                }
            };
            group.throughput(Throughput::Bytes(layer.bytes() as u64));
            let id = format!("{method}/{}", layer.choice().strategy);
            group.bench_function(BenchmarkId::new(id, tokens), |b| {
                b.iter_custom(|iters| {
                    let t = time_on_device(&device, 1, iters.max(1) as usize, || layer.forward())
                        .unwrap_or_else(|e| panic!("{method} T={tokens}: {e}"));
                    Duration::from_secs_f64(t.samples_ms.iter().sum::<f64>() * 1e-3)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
