//! Build script for the hand-written kernels of `kernels/` (docs: emulator.md §5, toolchain.md §3).
//!
//! 1. Always: the host CUDA emulator. `kernels/emu/emu_runtime.cpp` and one unity translation
//!    unit that includes every `kernels/*.cu` are compiled by the system C++ compiler (C++20,
//!    -O2, -march=x86-64, no fast-math) into `libsegvol_emu.a`, linked `+whole-archive` so the
//!    kernels' static registrars survive.
//! 2. When nvcc is found: every `kernels/*.cu` to PTX for sm_90a (or `$CUDA_ARCH`) and sm_80, an
//!    sm_90a cubin with `ptxas -v` (the resource report goes to the build log), and a build failure
//!    when a kernel whose name contains `attention` spills registers.
//! 3. `$OUT_DIR/kernels.rs` (included by `src/backend/kernel/embedded.rs`): the PTX, cubins and
//!    kernel names of every module, `BUILT_WITH_KERNELS`, `NVCC_VERSION`, `CUDA_ARCH`.
//!
//! Without nvcc the crate still builds (with a warning); `REQUIRE_CUDA_KERNELS=1` turns a missing
//! nvcc or a kernel compile error into a build failure with nvcc's message and command line.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

fn main() {
    let t0 = Instant::now();
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "REQUIRE_CUDA_KERNELS",
        "CUDA_ARCH",
        "EMU_CXXFLAGS",
        "SEGVOL_CUDA_ARCHS",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let require = env::var("REQUIRE_CUDA_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0");

    let files = kernel_files(&kdir);
    let names: Vec<Vec<String>> = files.iter().map(|f| kernel_names(f)).collect();
    check_names(&files, &names);

    // The emulator (two C++ translation units) and nvcc run side by side.
    let cuda = std::thread::scope(|s| {
        let emu = s.spawn(|| build_emulator(&kdir, &files, &out));
        let cuda = build_cuda(&manifest, &kdir, &files, &names, &out, require);
        if let Err(e) = emu.join() {
            std::panic::resume_unwind(e);
        }
        cuda
    });

    write_kernels_rs(&out, &files, &names, cuda.as_ref());
    println!(
        "build.rs: {} kernel files, emulator{} in {:.1} s",
        files.len(),
        if cuda.is_some() { " + nvcc" } else { "" },
        t0.elapsed().as_secs_f64()
    );
}

/// `kernels/*.cu`, sorted.
fn kernel_files(kdir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(kdir)
        .unwrap_or_else(|e| panic!("{}: {e}", kdir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

fn stem(f: &Path) -> String {
    f.file_stem().unwrap().to_string_lossy().into_owned()
}

/// The `EMU_KERNEL(name)` names of a kernel file (lines that start with it, outside `//` comments).
fn kernel_names(f: &Path) -> Vec<String> {
    let src = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    src.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("EMU_KERNEL(")?;
            let name = rest.split(')').next()?.trim();
            Some(name.to_string())
        })
        .collect()
}

/// Kernel names must be identifiers, start with `sv_` and be unique across files (they are global
/// C symbols, and the emulator's registry key): catch a clash here rather than at link time.
fn check_names(files: &[PathBuf], names: &[Vec<String>]) {
    let mut seen: Vec<(&str, &Path)> = Vec::new();
    for (f, ns) in files.iter().zip(names) {
        for n in ns {
            let ident = !n.is_empty()
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with(|c: char| c.is_ascii_digit());
            if !ident || !n.starts_with("sv_") {
                panic!(
                    "{}: EMU_KERNEL({n}): kernel names must be C identifiers starting with `sv_` \
                     (see the conventions in kernels/cuda_compat.cuh)",
                    f.display()
                );
            }
            if let Some((_, other)) = seen.iter().find(|(m, _)| *m == n) {
                panic!(
                    "kernel `{n}` is registered twice: EMU_KERNEL({n}) in {} and in {}",
                    other.display(),
                    f.display()
                );
            }
            seen.push((n, f));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Emulator
// ------------------------------------------------------------------------------------------------

fn emu_build(kdir: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .opt_level(2)
        .debug(false)
        .include(kdir)
        .warnings(true)
        // Kernels pun pointers (float* as float4*) as CUDA code does; nvcc tolerates it.
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas");
    // A fixed baseline ISA and no fast-math: results must not depend on the build machine.
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        b.flag("-march=x86-64");
    }
    if let Ok(extra) = env::var("EMU_CXXFLAGS") {
        for f in extra.split_whitespace() {
            b.flag(f);
        }
    }
    b
}

/// Compiles the runtime and the kernels (one unity TU: ~0.5 s of each g++ run is parsing the
/// standard headers, so one TU for all kernel files is several times faster than one per file)
/// in parallel, and archives them as `segvol_emu` (+whole-archive).
fn build_emulator(kdir: &Path, files: &[PathBuf], out: &Path) {
    let unity = out.join("emu_kernels_unity.cpp");
    let mut src =
        String::from("// @generated by build.rs: every kernels/*.cu in one translation unit\n");
    for f in files {
        writeln!(src, "#include {:?}", f.display().to_string()).unwrap();
    }
    write_if_changed(&unity, src.as_bytes());

    let runtime = kdir.join("emu").join("emu_runtime.cpp");
    let objs: Vec<PathBuf> = std::thread::scope(|s| {
        let jobs: Vec<_> = [runtime, unity]
            .into_iter()
            .map(|file| {
                s.spawn(move || {
                    let mut b = emu_build(kdir);
                    b.file(&file).cargo_metadata(false);
                    b.try_compile_intermediates().unwrap_or_else(|e| {
                        panic!("emulator build failed ({}): {e}", file.display())
                    })
                })
            })
            .collect();
        jobs.into_iter().flat_map(|j| j.join().unwrap()).collect()
    });
    let mut b = emu_build(kdir);
    b.objects(&objs)
        .link_lib_modifier("+whole-archive")
        .compile("segvol_emu");
}

// ------------------------------------------------------------------------------------------------
// nvcc
// ------------------------------------------------------------------------------------------------

struct Nvcc {
    nvcc: PathBuf,
    ptxas: PathBuf,
    version: String,
}

/// Lookup order of toolchain.md §3; a candidate counts only if `--version` runs.
fn find_nvcc(manifest: &Path) -> Option<Nvcc> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        cands.push(PathBuf::from(p));
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(v) {
            cands.push(PathBuf::from(p).join("bin").join("nvcc"));
        }
    }
    cands.push(manifest.join(".cuda/nvidia/cu13/bin/nvcc"));
    cands.push(PathBuf::from("nvcc"));
    cands.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    for c in cands {
        let Ok(o) = Command::new(&c).arg("--version").output() else {
            continue;
        };
        if !o.status.success() {
            println!("cargo:warning=ignoring {}: `--version` failed", c.display());
            continue;
        }
        let text = String::from_utf8_lossy(&o.stdout);
        let version = text
            .lines()
            .rfind(|l| l.contains("release"))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let sibling = c.with_file_name("ptxas");
        let ptxas = if c.components().count() > 1 && sibling.exists() {
            sibling
        } else {
            PathBuf::from("ptxas")
        };
        return Some(Nvcc {
            nvcc: c,
            ptxas,
            version,
        });
    }
    None
}

/// What nvcc produced for one kernel file.
struct CudaModule {
    ptx_primary: PathBuf,
    ptx_sm80: PathBuf,
    cubin_primary: PathBuf,
}

struct CudaBuild {
    version: String,
    arch: String,
    modules: Vec<CudaModule>,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let line = format!("{cmd:?}");
    match cmd.output() {
        Err(e) => Err(format!("{line}\n{e}")),
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            if o.status.success() {
                Ok(text)
            } else {
                Err(format!("{line}\n{text}"))
            }
        }
    }
}

/// Per-kernel lines of a `ptxas -v` report.
#[derive(Default, Clone)]
struct Resources {
    name: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn parse_ptxas(report: &str) -> Vec<Resources> {
    fn num_before(s: &str, unit: &str) -> Option<u32> {
        let i = s.find(unit)?;
        s[..i].split_whitespace().last()?.parse().ok()
    }
    let mut v: Vec<Resources> = Vec::new();
    for l in report.lines() {
        if let Some(rest) = l.split("Function properties for ").nth(1) {
            v.push(Resources {
                name: rest.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(r) = v.last_mut() {
            if l.contains("bytes stack frame") {
                r.stack = num_before(l, " bytes stack frame").unwrap_or(0);
                r.spill_stores = num_before(l, " bytes spill stores").unwrap_or(0);
                r.spill_loads = num_before(l, " bytes spill loads").unwrap_or(0);
            } else if l.contains("Used ") && l.contains(" registers") {
                r.registers = num_before(l, " registers").unwrap_or(0);
                r.smem = num_before(l, " bytes smem").unwrap_or(0);
            }
        }
    }
    v
}

/// A compile job `(file index, arch)` and nvcc+ptxas output or error.
type JobResult = ((usize, String), Result<String, String>);

fn build_cuda(
    manifest: &Path,
    kdir: &Path,
    files: &[PathBuf],
    names: &[Vec<String>],
    out: &Path,
    require: bool,
) -> Option<CudaBuild> {
    let Some(nv) = find_nvcc(manifest) else {
        if require {
            panic!(
                "REQUIRE_CUDA_KERNELS is set but nvcc was not found (looked at $NVCC, \
                 $CUDA_HOME/bin, $CUDA_PATH/bin, .cuda/nvidia/cu13/bin, PATH, /usr/local/cuda/bin); \
                 install it with tools/install-cuda.sh"
            );
        }
        println!(
            "cargo:warning=nvcc not found: building without CUDA kernels (the emu device still runs \
             them); tools/install-cuda.sh installs nvcc into .cuda/"
        );
        return None;
    };
    let arch = env::var("CUDA_ARCH")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "90a".into());
    // SEGVOL_CUDA_ARCHS=sm_90a (tools/gpu-check.sh --prepare): the sm_90a cubin and PTX only,
    // no portable sm_80 PTX, so the GPU bundle stays small; the sm_90a PTX stands in for it.
    let only_primary =
        env::var("SEGVOL_CUDA_ARCHS").is_ok_and(|v| v.trim() == format!("sm_{arch}"));
    let mut archs = vec![arch.clone()];
    if arch != "80" && !only_primary {
        archs.push("80".into());
    }
    // Jobs: (file index, arch); each runs nvcc -ptx, then ptxas.
    let jobs: Vec<(usize, String)> = (0..files.len())
        .flat_map(|i| archs.iter().map(move |a| (i, a.clone())))
        .collect();
    let queue = Mutex::new(jobs.clone());
    let results: Mutex<Vec<JobResult>> = Mutex::new(Vec::new());
    let threads = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, 8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some((i, a)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let f = &files[i];
                let st = stem(f);
                let ptx = out.join(format!("{st}.sm_{a}.ptx"));
                let cubin = out.join(format!("{st}.sm_{a}.cubin"));
                let r = run(Command::new(&nv.nvcc)
                    .args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
                    .arg(format!("-arch=sm_{a}"))
                    .arg("-I")
                    .arg(kdir)
                    .arg("-o")
                    .arg(&ptx)
                    .arg(f))
                .and_then(|_| {
                    run(Command::new(&nv.ptxas)
                        .args(["-O3", "-v"])
                        .arg(format!("-arch=sm_{a}"))
                        .arg(&ptx)
                        .arg("-o")
                        .arg(&cubin))
                });
                results.lock().unwrap().push(((i, a), r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| a.0.cmp(&b.0));

    let mut errors = String::new();
    let mut report = String::new();
    let mut spills = Vec::new();
    for ((i, a), r) in &results {
        match r {
            Err(e) => writeln!(errors, "{e}").unwrap(),
            Ok(text) => {
                writeln!(report, "== {} sm_{a}\n{text}", files[*i].display()).unwrap();
                for r in parse_ptxas(text) {
                    let spilled = r.spill_stores > 0 || r.spill_loads > 0;
                    if *a == arch {
                        println!(
                            "cargo:warning=ptxas sm_{a} {}: {} registers, {} B smem, {} B stack, \
                             spills {} B stores / {} B loads",
                            r.name, r.registers, r.smem, r.stack, r.spill_stores, r.spill_loads
                        );
                        if spilled && r.name.contains("attention") {
                            spills.push(format!(
                                "{} (sm_{a}): {} B spill stores, {} B spill loads",
                                r.name, r.spill_stores, r.spill_loads
                            ));
                        }
                    } else if spilled {
                        println!(
                            "cargo:warning=ptxas sm_{a} {}: spills {} B stores / {} B loads",
                            r.name, r.spill_stores, r.spill_loads
                        );
                    }
                }
            }
        }
    }
    fs::write(out.join("ptxas-report.txt"), &report).ok();
    if !errors.is_empty() {
        if require {
            panic!("CUDA kernel compilation failed (REQUIRE_CUDA_KERNELS is set):\n{errors}");
        }
        for l in errors.lines().take(40) {
            println!("cargo:warning={l}");
        }
        println!(
            "cargo:warning=CUDA kernel compilation failed with {}: building without CUDA kernels",
            nv.nvcc.display()
        );
        return None;
    }
    if !spills.is_empty() {
        panic!(
            "attention kernels must not spill registers:\n{}",
            spills.join("\n")
        );
    }
    let sm80 = if arch == "80" || only_primary {
        arch.clone()
    } else {
        "80".into()
    };
    let modules = files
        .iter()
        .map(|f| {
            let st = stem(f);
            CudaModule {
                ptx_primary: out.join(format!("{st}.sm_{arch}.ptx")),
                ptx_sm80: out.join(format!("{st}.sm_{sm80}.ptx")),
                cubin_primary: out.join(format!("{st}.sm_{arch}.cubin")),
            }
        })
        .collect();
    let nkernels: usize = names.iter().map(Vec::len).sum();
    println!(
        "cargo:warning=CUDA kernels: {} files, {nkernels} kernels, {} (sm_{arch} PTX + cubin, sm_80 PTX)",
        files.len(),
        nv.version
    );
    Some(CudaBuild {
        version: nv.version,
        arch,
        modules,
    })
}

// ------------------------------------------------------------------------------------------------
// kernels.rs
// ------------------------------------------------------------------------------------------------

fn write_kernels_rs(
    out: &Path,
    files: &[PathBuf],
    names: &[Vec<String>],
    cuda: Option<&CudaBuild>,
) {
    let mut s = String::from("// @generated by build.rs\n");
    let (built, version, arch) = match cuda {
        Some(c) => (true, c.version.as_str(), c.arch.as_str()),
        None => (false, "", ""),
    };
    writeln!(s, "pub const BUILT_WITH_KERNELS: bool = {built};").unwrap();
    writeln!(s, "pub const NVCC_VERSION: &str = {version:?};").unwrap();
    writeln!(s, "pub const CUDA_ARCH: &str = {arch:?};").unwrap();
    s.push_str("pub static MODULES: &[KernelModule] = &[\n");
    for (i, f) in files.iter().enumerate() {
        let path = |p: &Path| format!("{:?}", p.display().to_string());
        // Each kernel's parameters as its PTX declares them: what a launch must pass.
        let params: Vec<String> = match cuda {
            Some(c) => {
                let ptx = fs::read_to_string(&c.modules[i].ptx_primary)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.modules[i].ptx_primary.display()));
                let entries = ptx_entry_params(&ptx);
                for (e, _) in &entries {
                    if !names[i].contains(e) {
                        panic!(
                            "{}: kernel `{e}` is compiled but not registered with EMU_KERNEL({e})",
                            f.display()
                        );
                    }
                }
                names[i]
                    .iter()
                    .map(|n| {
                        entries
                            .iter()
                            .find(|(e, _)| e == n)
                            .map(|(_, p)| p.clone())
                            .unwrap_or_else(|| {
                                panic!(
                                    "{}: EMU_KERNEL({n}) has no `.entry {n}` in the PTX \
                                     (not an extern \"C\" __global__ kernel?)",
                                    f.display()
                                )
                            })
                    })
                    .collect()
            }
            None => vec![String::new(); names[i].len()],
        };
        let (ptx90, ptx80, cubin) = match cuda {
            Some(c) => {
                let m = &c.modules[i];
                (
                    format!("include_str!({})", path(&m.ptx_primary)),
                    format!("include_str!({})", path(&m.ptx_sm80)),
                    format!("include_bytes!({})", path(&m.cubin_primary)),
                )
            }
            None => ("\"\"".into(), "\"\"".into(), "&[]".into()),
        };
        writeln!(
            s,
            "    KernelModule {{ name: {:?}, ptx_sm90a: {ptx90}, ptx_sm80: {ptx80}, cubin_sm90a: {cubin}, kernels: &{:?}, params: &{:?} }},",
            stem(f),
            names[i],
            params
        )
        .unwrap();
    }
    s.push_str("];\n");
    write_if_changed(&out.join("kernels.rs"), s.as_bytes());
}

/// The parameters of every `.entry` of a PTX file, one letter each: `l` for an 8-byte
/// parameter (a pointer, `long long`, `size_t`: `.u64`/`.s64`/`.b64`), `w` for a 4-byte integer
/// (`.u32`/`.s32`/`.b32`), `f` for a `float` (`.f32`). These are the only kinds the launch code's
/// `KernelArgs` can pass; any other parameter (a struct by value, a `short`) stops the build.
fn ptx_entry_params(ptx: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines();
    while let Some(l) = lines.next() {
        let Some(rest) = l.trim().split(".entry ").nth(1) else {
            continue;
        };
        let name = rest.trim_end_matches('(').trim().to_string();
        let mut sig = String::new();
        for p in lines.by_ref() {
            let p = p.trim();
            if p.starts_with(')') {
                break;
            }
            let ty = p
                .strip_prefix(".param ")
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or_else(|| panic!("PTX entry `{name}`: unexpected parameter line `{p}`"));
            sig.push(match ty {
                ".u64" | ".s64" | ".b64" => 'l',
                ".u32" | ".s32" | ".b32" => 'w',
                ".f32" => 'f',
                other => panic!(
                    "PTX entry `{name}`: parameter type `{other}` (`{p}`) cannot be passed by \
                     KernelArgs (8-byte, 4-byte integer and float parameters only)"
                ),
            });
        }
        out.push((name, sig));
    }
    out
}

/// Leaves the file (and its mtime) alone when the content is unchanged.
fn write_if_changed(p: &Path, content: &[u8]) {
    if fs::read(p).ok().as_deref() != Some(content) {
        fs::write(p, content).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}
