//! Parser for the resource report ptxas prints with `-v` (NVRTC: `--ptxas-options=-v` and a
//! real `sm_XX` target). The report is plain text; this module turns it into numbers.

use serde::{Deserialize, Serialize};

/// What ptxas reports for one kernel entry point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryResources {
    /// Entry point name as in the cubin (unmangled for `extern "C"` kernels).
    pub entry: String,
    /// Registers per thread.
    pub registers: u32,
    /// Statically declared shared memory per block, in bytes.
    pub shared_bytes: u64,
    /// Constant bank 0 bytes (kernel parameters and compiler constants).
    pub constant_bytes: u64,
    /// Local memory (stack frame) per thread, in bytes: local arrays and spills.
    pub stack_frame_bytes: u64,
    /// Stack per thread including callees, in bytes.
    pub cumulative_stack_bytes: u64,
    /// Bytes of register spill stores per thread.
    pub spill_stores: u64,
    /// Bytes of register spill loads per thread.
    pub spill_loads: u64,
    /// Named barriers used (reported by newer ptxas only).
    pub barriers: u32,
}

/// The frame of a non-inlined device function (`__noinline__`, recursion), reported apart from
/// the entry points that call it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionFrame {
    /// Function name (usually mangled).
    pub name: String,
    /// Stack frame per thread, in bytes.
    pub stack_frame_bytes: u64,
    /// Bytes of register spill stores per thread.
    pub spill_stores: u64,
    /// Bytes of register spill loads per thread.
    pub spill_loads: u64,
}

/// Everything a ptxas `-v` log reports, in log order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxasReport {
    /// One record per kernel entry point.
    pub entries: Vec<EntryResources>,
    /// Non-entry functions with their own frames.
    pub functions: Vec<FunctionFrame>,
}

/// Text between the first pair of single quotes.
fn quoted(s: &str) -> Option<&str> {
    let start = s.find('\'')? + 1;
    let len = s[start..].find('\'')?;
    Some(&s[start..start + len])
}

/// The leading unsigned integer of `s` (after trimming), if any.
fn leading_number(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

/// `(stack frame, spill stores, spill loads)` from
/// `"256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"`.
fn parse_frame(s: &str) -> (u64, u64, u64) {
    let (mut frame, mut stores, mut loads) = (0, 0, 0);
    for item in s.split(',') {
        let n = leading_number(item).unwrap_or(0);
        if item.contains("stack frame") {
            frame = n;
        } else if item.contains("spill stores") {
            stores = n;
        } else if item.contains("spill loads") {
            loads = n;
        }
    }
    (frame, stores, loads)
}

/// Fills `e` from `"Used 40 registers, used 1 barriers, 128 bytes cumulative stack size, 256 bytes smem, ..."`.
fn parse_usage(s: &str, e: &mut EntryResources) {
    for item in s.split(',') {
        let item = item.trim();
        let item = item.strip_prefix("Used ").or_else(|| item.strip_prefix("used ")).unwrap_or(item);
        let Some(n) = leading_number(item) else { continue };
        if item.ends_with(" registers") {
            e.registers = n.try_into().unwrap_or(u32::MAX);
        } else if item.ends_with(" barriers") {
            e.barriers = n.try_into().unwrap_or(u32::MAX);
        } else if item.ends_with(" bytes smem") {
            e.shared_bytes = n;
        } else if item.contains(" bytes cmem[0]") {
            e.constant_bytes = n;
        } else if item.ends_with(" bytes cumulative stack size") {
            e.cumulative_stack_bytes = n;
        }
    }
}

/// Parses a ptxas `-v` log (as NVRTC returns it, compiler warnings and all). Lines it does not
/// recognise are skipped, so an unexpected format yields fewer records, never an error; callers
/// that need an entry check that it is present.
pub fn parse_ptxas_log(log: &str) -> PtxasReport {
    let mut report = PtxasReport::default();
    // Index into `entries` of the entry whose "Used ..." line comes next.
    let mut current_entry: Option<usize> = None;
    // Where the next "stack frame" line goes: an entry or a function frame.
    enum Frame {
        Entry(usize),
        Function(usize),
    }
    let mut current_frame: Option<Frame> = None;
    for line in log.lines() {
        let Some(rest) = line.strip_prefix("ptxas") else { continue };
        let body = rest.trim_start().trim_start_matches("info").trim_start().trim_start_matches(':').trim();
        if let Some(s) = body.strip_prefix("Compiling entry function") {
            let Some(name) = quoted(s) else { continue };
            report.entries.push(EntryResources { entry: name.to_string(), ..Default::default() });
            current_entry = Some(report.entries.len() - 1);
            current_frame = None;
        } else if let Some(s) = body.strip_prefix("Function properties for") {
            let name = s.trim();
            current_frame = Some(match report.entries.iter().rposition(|e| e.entry == name) {
                Some(i) => Frame::Entry(i),
                None => {
                    report.functions.push(FunctionFrame { name: name.to_string(), ..Default::default() });
                    Frame::Function(report.functions.len() - 1)
                }
            });
        } else if let Some(s) = body.strip_prefix('.') {
            let (frame, stores, loads) = parse_frame(s);
            match current_frame.take() {
                Some(Frame::Entry(i)) => {
                    let e = &mut report.entries[i];
                    (e.stack_frame_bytes, e.spill_stores, e.spill_loads) = (frame, stores, loads);
                }
                Some(Frame::Function(i)) => {
                    let f = &mut report.functions[i];
                    (f.stack_frame_bytes, f.spill_stores, f.spill_loads) = (frame, stores, loads);
                }
                None => {}
            }
        } else if body.starts_with("Used ") {
            if let Some(i) = current_entry.take() {
                parse_usage(body, &mut report.entries[i]);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    // Logs captured from NVRTC 12.4 (`--ptxas-options=-v`), unedited.
    const SM80: &str = include_str!("testdata/ptxas_sm80.log");
    const SM90_SPILLS: &str = include_str!("testdata/ptxas_sm90_spills.log");
    const SM86_CALLEE: &str = include_str!("testdata/ptxas_sm86_callee_warning.log");

    fn entry(r: &PtxasReport, name: &str) -> EntryResources {
        r.entries.iter().find(|e| e.entry == name).unwrap_or_else(|| panic!("{name} missing: {r:?}")).clone()
    }

    #[test]
    fn sm80_log() {
        let r = parse_ptxas_log(SM80);
        assert_eq!(r.entries.len(), 3);
        assert!(r.functions.is_empty());
        assert_eq!(
            entry(&r, "local_arr"),
            EntryResources {
                entry: "local_arr".into(),
                registers: 34,
                shared_bytes: 0,
                constant_bytes: 364,
                stack_frame_bytes: 256,
                cumulative_stack_bytes: 256,
                spill_stores: 0,
                spill_loads: 0,
                barriers: 0,
            }
        );
        let small = entry(&r, "small_f32");
        assert_eq!((small.registers, small.shared_bytes, small.constant_bytes), (10, 1024, 372));
        assert_eq!(entry(&r, "spilly").registers, 32);
    }

    #[test]
    fn sm90_log_with_spills_and_override_notes() {
        let r = parse_ptxas_log(SM90_SPILLS);
        assert_eq!(
            r.entries.iter().map(|e| e.entry.as_str()).collect::<Vec<_>>(),
            ["local_arr", "spilly", "small_f32"]
        );
        let s = entry(&r, "spilly");
        assert_eq!((s.registers, s.stack_frame_bytes, s.spill_stores, s.spill_loads), (32, 1304, 3200, 3200));
        assert_eq!(s.cumulative_stack_bytes, 1304);
        assert_eq!(entry(&r, "small_f32").shared_bytes, 1024);
        assert_eq!(entry(&r, "local_arr").spill_stores, 0);
    }

    #[test]
    fn callee_frames_and_compiler_warnings() {
        let r = parse_ptxas_log(SM86_CALLEE);
        assert_eq!(r.entries.len(), 2);
        let h = entry(&r, "with_helper");
        assert_eq!((h.registers, h.shared_bytes, h.stack_frame_bytes, h.cumulative_stack_bytes), (40, 256, 128, 128));
        assert_eq!(entry(&r, "_Z4tmplIfEvPT_").registers, 8);
        assert_eq!(r.functions, vec![FunctionFrame { name: "_Z6helperPfi".into(), ..Default::default() }]);
    }

    #[test]
    fn barriers_and_unknown_items() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                   ptxas info    : Function properties for k\n\
                   ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 8 bytes cumulative stack size, \
                   49152 bytes smem, 7 bytes something new\n";
        let e = entry(&parse_ptxas_log(log), "k");
        assert_eq!((e.registers, e.barriers, e.shared_bytes), (168, 1, 49152));
        assert_eq!((e.stack_frame_bytes, e.spill_stores, e.spill_loads), (8, 4, 12));
    }

    #[test]
    fn garbage_yields_nothing() {
        assert_eq!(parse_ptxas_log(""), PtxasReport::default());
        assert_eq!(
            parse_ptxas_log("ptxas info : Used 3 registers\nptxas . 1 bytes stack frame"),
            PtxasReport::default()
        );
        let r = parse_ptxas_log("ptxas info    : Compiling entry function 'unterminated for 'sm_80'\n");
        assert_eq!(r.entries[0].entry, "unterminated for ");
        assert!(parse_ptxas_log("ptxas info    : Compiling entry function no quotes\n").entries.is_empty());
    }
}
