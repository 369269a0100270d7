//! Strict weight loading and saving.
//!
//! A [`StateDict`] is a flat `name → tensor` map read from a `.safetensors` file or a PyTorch `.bin`
//! (`torch.save` zip; read by burn-store's pickle reader, which never executes pickle code). Each
//! network owns a [`KeyMap`]: ordered regex rewrites from the reference's key names (diffusers,
//! transformers or LAVIS) to our module paths. [`load_strict`] applies a state dict to a module and
//! fails with **every** missing, unexpected and shape-mismatched key listed in one error.
//! [`save_safetensors`] writes the reverse mapping, so our checkpoints open in diffusers.

mod diffusers;
pub mod lavis;
pub use diffusers::{component_weight_file, ComponentDir, DiffusersFolder};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::module::{Module, ParamId};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    BurnToPyTorchAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore, PytorchStore, TensorSnapshot,
};

/// Everything that can go wrong reading, mapping, applying or writing weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("reading weights {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("writing weights {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("no weight file for component `{component}` in {dir} (looked for {looked_for})")]
    NoWeightFile {
        component: String,
        dir: PathBuf,
        looked_for: String,
    },
    #[error("bad key map rule `{pattern}`: {message}")]
    KeyMap { pattern: String, message: String },
    #[error("{0}")]
    Mismatch(Box<MismatchReport>),
}

/// The full list of problems found when applying a state dict to a module.
#[derive(Debug, Default, Clone)]
pub struct MismatchReport {
    pub component: String,
    pub source: PathBuf,
    /// Module paths with no tensor in the file.
    pub missing: Vec<String>,
    /// File keys (after mapping) that no module parameter takes.
    pub unexpected: Vec<String>,
    /// `path: expected [..], found [..]` (and dtype / load errors).
    pub mismatched: Vec<String>,
}

impl MismatchReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "weights for `{}` from {} do not fit the model: {} missing, {} unexpected, {} mismatched",
            self.component,
            self.source.display(),
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len()
        )?;
        for m in &self.missing {
            writeln!(f, "  missing:    {m}")?;
        }
        for u in &self.unexpected {
            writeln!(f, "  unexpected: {u}")?;
        }
        for s in &self.mismatched {
            writeln!(f, "  mismatched: {s}")?;
        }
        Ok(())
    }
}

/// A flat map of named tensors, as stored in a checkpoint file.
pub struct StateDict {
    pub source: PathBuf,
    pub tensors: BTreeMap<String, TensorSnapshot>,
}

impl StateDict {
    /// Read a `.safetensors` file or a PyTorch `.bin`/`.pt`/`.pth` file (by extension).
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "safetensors" {
            Self::read_safetensors(path)
        } else {
            Self::read_pytorch(path, None)
        }
    }

    /// Read a `.safetensors` file by memory map. Tensors are not copied: the data each snapshot yields
    /// refers to the mapped file (as safetensors and diffusers load on the CPU), so a loaded f32 model
    /// on the CPU backend holds its weights once, as page-cache pages, and loading costs no copy. A
    /// tensor whose bytes are not aligned for its dtype in the file (possible after odd-length f16
    /// tensors) is copied instead. The file must not be modified while the model is in use.
    pub fn read_safetensors(path: &Path) -> Result<Self, WeightsError> {
        let err = |message: String| WeightsError::Read {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        // SAFETY: the map is read-only and private to this process; like every memory-mapped
        // loader (safetensors' `safe_open`, diffusers) it relies on the file not being truncated
        // while mapped, which the docs ask of users.
        // `populate`: the pages are mapped now (MAP_POPULATE: read ahead, page tables filled), so
        // the first forward pass does not stop on a page fault per 4 KiB of weights.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .map_err(|e| err(e.to_string()))?;
        let owner = bytes::Bytes::from_owner(MappedFile(map));
        let st = safetensors::SafeTensors::deserialize(&owner).map_err(|e| err(e.to_string()))?;
        let base = owner.as_ptr() as usize;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = safetensors_dtype(view.dtype())
                .ok_or_else(|| err(format!("`{name}`: unsupported dtype {:?}", view.dtype())))?;
            let start = view.data().as_ptr() as usize - base;
            let range = start..start + view.data().len();
            let shape: Vec<usize> = view.shape().to_vec();
            let owner = owner.clone();
            let data_shape = shape.clone();
            let data_fn = Rc::new(move || {
                let bytes = owner.slice(range.clone());
                let align = dtype.size().max(1);
                let bytes = if (bytes.as_ptr() as usize).is_multiple_of(align) {
                    burn::tensor::Bytes::from_shared(bytes, burn::tensor::AllocationProperty::File)
                } else {
                    burn::tensor::Bytes::from_bytes_vec(bytes.to_vec())
                };
                Ok(TensorData {
                    bytes,
                    shape: data_shape.clone().into(),
                    dtype,
                })
            });
            let parts: Vec<String> = name.split('.').map(str::to_string).collect();
            let n = parts.len();
            let snap = TensorSnapshot::from_closure(
                data_fn,
                dtype,
                shape.into(),
                parts,
                vec![String::new(); n],
                ParamId::new(),
            );
            tensors.insert(name.to_string(), snap);
        }
        Ok(Self {
            source: path.to_path_buf(),
            tensors,
        })
    }

    /// Read a `torch.save` file without executing pickle code. `top_level_key` selects a nested
    /// dict (e.g. LAVIS's `"model"`).
    pub fn read_pytorch(path: &Path, top_level_key: Option<&str>) -> Result<Self, WeightsError> {
        let err = |message: String| WeightsError::Read {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        if let Some(key) = top_level_key {
            store = store.with_top_level_key(key);
        }
        let tensors = store
            .get_all_snapshots()
            .map_err(|e| err(e.to_string()))?
            .clone();
        Ok(Self {
            source: path.to_path_buf(),
            tensors,
        })
    }

    /// An in-memory state dict (tests, conversions).
    pub fn from_tensors(source: impl Into<PathBuf>, tensors: Vec<(String, TensorData)>) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(name, data)| {
                let snap = snapshot_from_data(&name, data);
                (name, snap)
            })
            .collect();
        Self {
            source: source.into(),
            tensors,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Materialise one tensor's data.
    pub fn data(&self, name: &str) -> Result<TensorData, WeightsError> {
        let snap = self.tensors.get(name).ok_or_else(|| WeightsError::Read {
            path: self.source.clone(),
            message: format!("no tensor named `{name}`"),
        })?;
        snap.to_data().map_err(|e| WeightsError::Read {
            path: self.source.clone(),
            message: format!("`{name}`: {e:?}"),
        })
    }

    /// Remove and return one tensor's data (for custom transforms such as splitting fused QKV).
    pub fn take(&mut self, name: &str) -> Result<TensorData, WeightsError> {
        let data = self.data(name)?;
        self.tensors.remove(name);
        Ok(data)
    }

    /// Insert a tensor under `name`.
    pub fn insert(&mut self, name: impl Into<String>, data: TensorData) {
        let name = name.into();
        let snap = snapshot_from_data(&name, data);
        self.tensors.insert(name, snap);
    }

    /// Keep only keys starting with `prefix`, with the prefix removed.
    pub fn sub(&self, prefix: &str) -> StateDict {
        let tensors = self
            .tensors
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix)
                    .map(|rest| (rest.to_string(), rename_snapshot(v, rest)))
            })
            .collect();
        StateDict {
            source: self.source.clone(),
            tensors,
        }
    }

    /// Drop every key matching `pred` (e.g. non-persistent buffers such as `position_ids`).
    pub fn drop_keys(&mut self, pred: impl Fn(&str) -> bool) {
        self.tensors.retain(|k, _| !pred(k));
    }

    /// Rename keys through a key map (first matching rule wins, then later rules see the result).
    pub fn remap(self, map: &KeyMap) -> Result<Self, WeightsError> {
        let remapper = map.remapper()?;
        let source = self.source.clone();
        let mut tensors = BTreeMap::new();
        for (name, snap) in self.tensors {
            let new = remapper.apply(&name);
            let snap = rename_snapshot(&snap, &new);
            tensors.insert(new, snap);
        }
        Ok(Self { source, tensors })
    }

    /// Total number of scalar values.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(|s| s.shape.num_elements()).sum()
    }
}

/// `[r, c]` f32 data as `[c, r]`: 32×32 tiles, bands of 32 output rows split over the thread pool.
fn transpose_f32(data: TensorData) -> TensorData {
    use rayon::prelude::*;
    let [r, c] = [data.shape[0], data.shape[1]];
    let src = data.as_slice::<f32>().expect("f32 data");
    let mut dst = vec![0.0f32; r * c];
    const T: usize = 32;
    if r > 0 {
        dst.par_chunks_mut(T * r)
            .enumerate()
            .for_each(|(band, out)| {
                let j0 = band * T;
                let cols = out.len() / r;
                for i0 in (0..r).step_by(T) {
                    for i in i0..(i0 + T).min(r) {
                        let row = &src[i * c + j0..i * c + j0 + cols];
                        for (jj, v) in row.iter().enumerate() {
                            out[jj * r + i] = *v;
                        }
                    }
                }
            });
    }
    TensorData::new(dst, [c, r])
}

/// When `bytes` are part of a memory-mapped weights file and their values have been copied (a
/// transposed `Linear` weight, a converted dtype), drops this process's mapping of the whole pages
/// inside them, so that the file's copy does not stay resident beside ours. The mapping is private
/// and read-only: a later read of those pages (there is none) would map them again from the file.
fn release_mapped(bytes: &burn::tensor::Bytes) {
    if !matches!(bytes.property(), burn::tensor::AllocationProperty::File) {
        return;
    }
    const PAGE: usize = 4096;
    let (ptr, len) = (bytes.as_ptr() as usize, bytes.len());
    let start = ptr.next_multiple_of(PAGE);
    let end = (ptr + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside `bytes`, which borrows a live read-only private file
        // mapping; MADV_DONTNEED only drops the mapping of those pages (no data is lost).
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// The memory map behind [`StateDict::read_safetensors`]'s tensors (kept alive by them).
struct MappedFile(memmap2::Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn safetensors_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U64 => DType::U64,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool(burn::tensor::BoolStore::Native),
        _ => return None,
    })
}

fn snapshot_from_data(name: &str, data: TensorData) -> TensorSnapshot {
    let path: Vec<String> = name.split('.').map(str::to_string).collect();
    let n = path.len();
    TensorSnapshot::from_data(data, path, vec![String::new(); n], ParamId::new())
}

fn rename_snapshot(snap: &TensorSnapshot, name: &str) -> TensorSnapshot {
    let path: Vec<String> = name.split('.').map(str::to_string).collect();
    let n = path.len();
    TensorSnapshot::from_closure(
        snap.clone_data_fn(),
        snap.dtype,
        snap.shape.clone(),
        path,
        vec![String::new(); n],
        snap.tensor_id.unwrap_or_default(),
    )
}

/// Ordered regex rewrites from a reference layout's keys to our module paths.
///
/// Rules are `(pattern, replacement)` with `regex` syntax (`$1` for groups) and are applied in order,
/// each to the result of the previous one. [`KeyMap::reverse`] rules go the other way for saving.
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    pub rules: Vec<(String, String)>,
}

impl KeyMap {
    pub fn new(rules: &[(&str, &str)]) -> Self {
        Self {
            rules: rules
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    /// Identity map.
    pub fn identity() -> Self {
        Self::default()
    }

    /// Prefix every rule's output... i.e. compose: first `self`, then `next`.
    pub fn then(mut self, next: &KeyMap) -> Self {
        self.rules.extend(next.rules.iter().cloned());
        self
    }

    fn remapper(&self) -> Result<CompiledKeyMap, WeightsError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for (pattern, to) in &self.rules {
            let re = regex::Regex::new(pattern).map_err(|e| WeightsError::KeyMap {
                pattern: pattern.clone(),
                message: e.to_string(),
            })?;
            rules.push((re, to.clone()));
        }
        Ok(CompiledKeyMap { rules })
    }

    /// Map a single key.
    pub fn map_key(&self, key: &str) -> Result<String, WeightsError> {
        Ok(self.remapper()?.apply(key))
    }
}

struct CompiledKeyMap {
    rules: Vec<(regex::Regex, String)>,
}

impl CompiledKeyMap {
    fn apply(&self, key: &str) -> String {
        let mut out = key.to_string();
        for (re, to) in &self.rules {
            out = re.replace_all(&out, to.as_str()).into_owned();
        }
        out
    }
}

/// Casts every float tensor to one dtype while loading (fp16/bf16 checkpoints into f32 models).
#[derive(Clone)]
pub struct CastAdapter(pub DType);

impl ModuleAdapter for CastAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        if snapshot.dtype == target || !is_float(snapshot.dtype) {
            return snapshot.clone();
        }
        let inner = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || inner().map(|d| d.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

fn is_float(d: DType) -> bool {
    matches!(
        d,
        DType::F64 | DType::F32 | DType::F16 | DType::BF16 | DType::Flex32
    )
}

/// Apply `sd` (already in our key space, or mapped through `map`) to `module`, strictly.
///
/// Every module parameter must be present with the right shape, and every key in the file must be
/// used. On failure the error lists all problems at once. Float tensors are cast to `dtype`.
pub fn load_strict<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    module: M,
    sd: StateDict,
    map: &KeyMap,
    component: &str,
) -> Result<M, WeightsError> {
    let sd = sd.remap(map)?;
    let mut applier = StrictApplier::<B> {
        tensors: &sd.tensors,
        path: Vec::new(),
        containers: Vec::new(),
        used: std::collections::HashSet::new(),
        missing: Vec::new(),
        mismatched: Vec::new(),
        _backend: std::marker::PhantomData,
    };
    let module = module.map(&mut applier);
    let mut report = MismatchReport {
        component: component.to_string(),
        source: sd.source.clone(),
        missing: applier.missing,
        unexpected: sd
            .tensors
            .keys()
            .filter(|k| !applier.used.contains(*k))
            .cloned()
            .collect(),
        mismatched: applier.mismatched,
    };
    report.missing.sort();
    report.unexpected.sort();
    if report.is_empty() {
        Ok(module)
    } else {
        Err(WeightsError::Mismatch(Box::new(report)))
    }
}

/// Puts each parameter's tensor from a state dict in our key space into a module, by path, strictly.
///
/// The reference layouts' conventions are applied here: `Linear` weights are stored `[out, in]` and
/// become the transposed *view* Burn's `[in, out]` parameter expects (no copy: with
/// [`StateDict::read_safetensors`]'s memory-mapped data the CPU backend's weights stay in the page
/// cache), norm `gamma`/`beta` are found under `weight`/`bias`, and float tensors are converted to
/// f32. Parameters without a tensor keep their initialisation and are reported missing.
struct StrictApplier<'a, B: Backend> {
    tensors: &'a BTreeMap<String, TensorSnapshot>,
    path: Vec<String>,
    containers: Vec<String>,
    used: std::collections::HashSet<String>,
    missing: Vec<String>,
    mismatched: Vec<String>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> StrictApplier<'_, B> {
    /// The file key holding the current parameter (trying `weight`/`bias` for a norm's
    /// `gamma`/`beta`), and whether it is a `Linear` weight.
    fn lookup(&self) -> Option<(String, bool)> {
        let path = self.path.join(".");
        let module = self
            .containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .map(String::as_str);
        let name = self.path.last().map(String::as_str);
        let linear_weight = module == Some("Struct:Linear") && name == Some("weight");
        if self.tensors.contains_key(&path) {
            return Some((path, linear_weight));
        }
        let norm = matches!(
            module,
            Some("Struct:LayerNorm" | "Struct:GroupNorm" | "Struct:BatchNorm" | "Struct:RmsNorm")
        );
        let alias = match name {
            Some("gamma") if norm => "weight",
            Some("beta") if norm => "bias",
            _ => return None,
        };
        let mut alt = self.path.clone();
        *alt.last_mut()? = alias.to_string();
        let alt = alt.join(".");
        self.tensors.contains_key(&alt).then_some((alt, false))
    }
}

impl<B: Backend> burn::module::ModuleMapper<B> for StrictApplier<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let path = self.path.join(".");
        let Some((key, linear_weight)) = self.lookup() else {
            self.missing.push(path);
            return param;
        };
        self.used.insert(key.clone());
        let snap = &self.tensors[&key];
        let want: Vec<usize> = param.lazy_shape().iter().copied().collect();
        let mut file: Vec<usize> = snap.shape.iter().copied().collect();
        if linear_weight && D == 2 {
            file.reverse();
        }
        if file != want {
            self.mismatched.push(format!(
                "{path}: expected {want:?}, found {:?} (`{key}`)",
                snap.shape.iter().collect::<Vec<_>>()
            ));
            return param;
        }
        let data = match snap.to_data() {
            Ok(d) => d,
            Err(e) => {
                self.mismatched
                    .push(format!("{path}: reading `{key}`: {e:?}"));
                return param;
            }
        };
        let copied = (is_float(data.dtype) && data.dtype != DType::F32) || linear_weight;
        let mut out = if is_float(data.dtype) && data.dtype != DType::F32 {
            data.clone().convert_dtype(DType::F32)
        } else {
            data.clone()
        };
        if linear_weight && D == 2 {
            // [out, in] → [in, out], stored contiguously: the GEMM packs a row-major weight faster
            // than a transposed view (measured: up to 2× on SD's shapes).
            out = transpose_f32(out);
        }
        if copied {
            release_mapped(&data.bytes);
        }
        drop(data);
        let tensor = Tensor::<B, D>::from_data(out, &param.lazy_device());
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Collect a module's parameters under reference names (Linear transposed back, norms renamed
/// to weight/bias) through `reverse` rules.
pub fn collect_reference<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    reverse: &KeyMap,
) -> Result<Vec<(String, TensorData)>, WeightsError> {
    let remapper = reverse.remapper()?;
    let snaps = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    let mut out = Vec::with_capacity(snaps.len());
    for s in snaps {
        let name = remapper.apply(&s.full_path());
        let data = s.to_data().map_err(|e| WeightsError::Write {
            path: PathBuf::from(&name),
            message: format!("{e:?}"),
        })?;
        out.push((name, data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Write named tensors to a `.safetensors` file atomically (temp file + fsync + rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), WeightsError> {
    use safetensors::tensor::{Dtype, TensorView};
    let err = |message: String| WeightsError::Write {
        path: path.to_path_buf(),
        message,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let dtype = match data.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F64 => Dtype::F64,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            DType::U8 => Dtype::U8,
            DType::Bool(_) => Dtype::BOOL,
            other => return Err(err(format!("`{name}`: unsupported dtype {other:?}"))),
        };
        let view = TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
            .map_err(|e| err(format!("`{name}`: {e}")))?;
        views.push((name.clone(), view));
    }
    let bytes = safetensors::serialize(views, metadata).map_err(|e| err(e.to_string()))?;
    atomic_write(path, &bytes).map_err(|e| err(e.to_string()))
}

/// Write bytes to `path` via a temp file in the same folder, fsync, then rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Save a module in the reference layout (diffusers / transformers names) as safetensors.
pub fn save_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    reverse: &KeyMap,
    path: &Path,
) -> Result<(), WeightsError> {
    let tensors = collect_reference(module, reverse)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(path, &tensors, Some(meta))
}

/// Number of scalar parameters of a module.
pub fn num_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    module.num_params()
}
