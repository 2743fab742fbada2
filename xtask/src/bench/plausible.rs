//! Figures the bench must not publish: a throughput no proxy on this machine can reach.
//!
//! A loopback transfer copies every byte at least twice (into the kernel on send, out of it on
//! receive), so with `cpus` cores copying at `copy` bytes/s each, no transfer moves more than
//! `copy × cpus / 2` bytes/s, and through a proxy there is at least one more hop. And a proxy
//! adds work to the direct path, so its median cannot beat the best direct round of the same run
//! by more than the noise between rounds. A run that breaks either rule has a defect in how it
//! measures (the 365 Gbit/s stream64 round of issue 15 came from a clock that started after the
//! 64 writers had been running for a while); the bench says so and fails instead of printing
//! those figures as results.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Sample, median};

/// How far a proxied median may exceed direct's best round of the same run, at least: round-to-
/// round noise on this 2-vCPU machine is up to ±25 % (stream1 direct 13.7–17.0 Gbit/s in one
/// run). A run whose direct rounds spread wider allows that spread; a run with one round of
/// direct (nothing to tell noise from), twice direct.
pub const NOISE: f64 = 0.25;

/// This machine's bound on loopback throughput, in Gbit/s.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub copy_gbit: f64,
}

impl Bound {
    /// Measures one core's memory-copy rate (best of a few rounds of 256 copies of 1 MiB, which
    /// stays in cache as a socket's chunks do) and scales it to every core, two copies per byte.
    pub fn measure() -> Bound {
        const LEN: usize = 1 << 20;
        const COPIES: usize = 256;
        let src = vec![0x5au8; LEN];
        let mut dst = vec![0u8; LEN];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..COPIES {
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&mut dst);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let per_core = (LEN * COPIES) as f64 / best.max(1e-9);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Bound {
            copy_gbit: per_core * cpus / 2.0 * 8.0 / 1e9,
        }
    }
}

/// Every figure of `samples` (by scenario and target) that cannot be true, in words.
pub fn implausible(samples: &BTreeMap<(String, String), Vec<Sample>>, bound: Bound) -> Vec<String> {
    let mut found = Vec::new();
    for ((scenario, target), runs) in samples {
        let rates: Vec<f64> = runs
            .iter()
            .filter_map(|s| s.get("gbit_s").copied())
            .collect();
        for (i, &r) in rates.iter().enumerate() {
            if r > bound.copy_gbit {
                found.push(format!(
                    "{scenario} on {target}: round {} measured {r:.1} Gbit/s, above what this \
                     machine can copy ({:.1} Gbit/s: every core copying, two copies per byte)",
                    i + 1,
                    bound.copy_gbit
                ));
            }
        }
        if target == "direct" || rates.is_empty() {
            continue;
        }
        let direct: Vec<f64> = samples
            .get(&(scenario.clone(), "direct".to_string()))
            .map(|d| d.iter().filter_map(|s| s.get("gbit_s").copied()).collect())
            .unwrap_or_default();
        let Some(best) = direct.iter().copied().reduce(f64::max) else {
            continue;
        };
        let noise = if direct.len() < 2 {
            1.0
        } else {
            let worst = direct.iter().copied().reduce(f64::min).unwrap_or(best);
            ((best - worst) / median(&direct)).max(NOISE)
        };
        let median = median(&rates);
        if median > best * (1.0 + noise) {
            found.push(format!(
                "{scenario} on {target}: median {median:.1} Gbit/s, more than {:.0} % (the noise \
                 of direct's rounds) above the best direct round of the same run ({best:.1}); a \
                 proxy only adds work",
                noise * 100.0
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(gbit: &[f64]) -> Vec<Sample> {
        gbit.iter()
            .map(|&g| {
                let mut s = Sample::new();
                s.insert("gbit_s", g);
                s.insert("total_cpu_s_per_gb", 1.0);
                s
            })
            .collect()
    }

    fn key(s: &str, t: &str) -> (String, String) {
        (s.to_string(), t.to_string())
    }

    const BOUND: Bound = Bound { copy_gbit: 200.0 };

    #[test]
    fn figures_like_a_normal_run_pass() {
        let mut m = BTreeMap::new();
        m.insert(key("stream1", "direct"), runs(&[13.7, 15.3, 17.0]));
        m.insert(key("stream1", "splice"), runs(&[9.9, 10.6, 11.3]));
        m.insert(key("stream1", "sockmap"), runs(&[6.0, 6.0, 6.0]));
        // A proxy round a little above direct's median is noise, not a defect.
        m.insert(key("stream8", "direct"), runs(&[27.9, 33.7]));
        m.insert(key("stream8", "sockmap"), runs(&[30.0, 36.0]));
        // Handshakes carry no Gbit/s.
        let mut hs = Sample::new();
        hs.insert("per_s", 6000.0);
        m.insert(key("handshake", "copy"), vec![hs]);
        assert_eq!(implausible(&m, BOUND), Vec::<String>::new());
    }

    #[test]
    fn the_stream64_figures_of_issue_15_fail() {
        let mut m = BTreeMap::new();
        m.insert(key("stream64", "direct"), runs(&[36.3, 72.0, 169.3]));
        m.insert(key("stream64", "sockmap"), runs(&[16.6, 101.2, 365.2]));
        m.insert(key("stream64", "copy"), runs(&[15.0, 15.5, 16.0]));
        let found = implausible(&m, BOUND);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].starts_with("stream64 on sockmap: round 3 measured 365.2"));
        // With a tighter machine bound, direct's own best round is caught too.
        let found = implausible(&m, Bound { copy_gbit: 120.0 });
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("stream64 on direct: round 3"))
        );
    }

    #[test]
    fn a_proxy_far_above_direct_fails() {
        let mut m = BTreeMap::new();
        m.insert(key("stream8", "direct"), runs(&[28.0, 30.0, 31.0]));
        m.insert(key("stream8", "sockmap"), runs(&[40.0, 41.0, 45.0]));
        let found = implausible(&m, BOUND);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("median 41.0 Gbit/s"), "{}", found[0]);
        assert!(found[0].contains("(31.0)"), "{}", found[0]);
        // Direct's own rounds spread by 60 %: that much is noise.
        m.insert(key("stream8", "direct"), runs(&[20.0, 25.0, 35.0]));
        assert_eq!(implausible(&m, BOUND), Vec::<String>::new());
        // One round of direct: only twice its figure is flagged.
        m.insert(key("stream8", "direct"), runs(&[21.0]));
        assert_eq!(implausible(&m, BOUND), Vec::<String>::new());
        m.insert(key("stream8", "direct"), runs(&[20.0]));
        assert_eq!(implausible(&m, BOUND).len(), 1);
    }

    #[test]
    fn the_memory_copy_bound_is_a_real_rate() {
        let b = Bound::measure();
        // Any machine this runs on copies at more than 1 Gbit/s and less than 10 Tbit/s.
        assert!(
            b.copy_gbit > 1.0 && b.copy_gbit < 10_000.0,
            "{:.1} Gbit/s",
            b.copy_gbit
        );
    }
}
