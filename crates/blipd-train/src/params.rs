//! Parameter paths, and module weights as safetensors keyed by those paths.
//!
//! A parameter's path is the dotted chain of struct field names and `Vec` indices that leads to
//! it (`blocks.0.attn.qkv.weight`), as Burn's module visitor reports it. Paths are stable across
//! processes (unlike `ParamId`s of freshly built modules), so checkpoints, optimizer state and
//! EMA weights are keyed by path.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::tensor::{Dtype as StDtype, TensorView, View};

use crate::error::{Result, TrainError};

/// One float parameter of a module.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Whether the parameter is trainable (`require_grad`).
    pub trainable: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Keeps the current path while Burn walks a module.
#[derive(Default)]
pub(crate) struct PathStack {
    parts: Vec<String>,
}

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str) {
        self.parts.push(name.to_string());
    }
    pub(crate) fn exit(&mut self) {
        self.parts.pop();
    }
    pub(crate) fn path(&self) -> String {
        self.parts.join(".")
    }
}

/// Every float parameter of `module`, in visiting order (the order of the struct fields).
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    struct V {
        stack: PathStack,
        out: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            self.out.push(ParamInfo {
                path: self.stack.path(),
                id: param.id,
                shape: t.dims().to_vec(),
                dtype: t.dtype(),
                trainable: t.is_require_grad(),
            });
        }
    }
    let mut v = V {
        stack: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Every float parameter of `module` as a flat 1-D tensor, keyed by path, in visiting order.
pub fn flat_params<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Tensor<B, 1>)> {
    struct V<B: Backend> {
        stack: PathStack,
        out: Vec<(String, Tensor<B, 1>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for V<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let n = t.dims().iter().product::<usize>();
            self.out.push((self.stack.path(), t.reshape([n])));
        }
    }
    let mut v = V {
        stack: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

pub(crate) fn to_st_dtype(dtype: DType) -> Option<StDtype> {
    Some(match dtype {
        DType::F64 => StDtype::F64,
        DType::F32 | DType::Flex32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        _ => return None,
    })
}

pub(crate) fn from_st_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F64 => DType::F64,
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        _ => return None,
    })
}

/// A tensor that is read back from the device only when safetensors writes it, so that a
/// checkpoint never holds more than one tensor on the host at a time.
pub(crate) struct LazyView<B: Backend> {
    tensor: Tensor<B, 1>,
    shape: Vec<usize>,
    dtype: StDtype,
    len: usize,
}

impl<B: Backend> LazyView<B> {
    pub(crate) fn new(tensor: Tensor<B, 1>, shape: Vec<usize>) -> Result<Self, String> {
        let dtype = to_st_dtype(tensor.dtype())
            .ok_or_else(|| format!("unsupported dtype {:?}", tensor.dtype()))?;
        let numel: usize = shape.iter().product();
        let len = numel * dtype.bitsize() / 8;
        Ok(Self {
            tensor,
            shape,
            dtype,
            len,
        })
    }
}

impl<B: Backend> View for LazyView<B> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut data = self.tensor.to_data();
        if data.dtype == DType::Flex32 {
            data = data.convert_dtype(DType::F32);
        }
        Cow::Owned(data.into_bytes().to_vec())
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes named flat tensors (with their logical shapes) to a safetensors file.
pub(crate) fn write_tensors<B: Backend>(
    path: &Path,
    tensors: Vec<(String, Tensor<B, 1>, Vec<usize>)>,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t, shape) in tensors {
        let view = LazyView::new(t, shape).map_err(|m| TrainError::StateMismatch {
            path: path.to_path_buf(),
            message: format!("`{name}`: {m}"),
        })?;
        views.push((name, view));
    }
    let meta: HashMap<String, String> = metadata.into_iter().collect();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| TrainError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A safetensors file read into memory.
pub(crate) struct TensorFile {
    pub(crate) path: std::path::PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let f = Self {
            path: path.to_path_buf(),
            bytes,
        };
        f.parse()?;
        Ok(f)
    }

    pub(crate) fn parse(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.bytes).map_err(|e| TrainError::Safetensors {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    pub(crate) fn metadata(&self) -> Result<BTreeMap<String, String>> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&self.bytes).map_err(|e| {
            TrainError::Safetensors {
                path: self.path.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect())
    }
}

pub(crate) fn view_to_data(path: &Path, name: &str, view: &TensorView<'_>) -> Result<TensorData> {
    let dtype = from_st_dtype(view.dtype()).ok_or_else(|| TrainError::StateMismatch {
        path: path.to_path_buf(),
        message: format!("`{name}` has unsupported dtype {:?}", view.dtype()),
    })?;
    Ok(TensorData::from_bytes_vec(
        view.data().to_vec(),
        view.shape().to_vec(),
        dtype,
    ))
}

/// Saves every float parameter of `module` to `path` (safetensors, keys = parameter paths,
/// each tensor in its own dtype and shape). `metadata` goes into the file header.
pub fn save_module<B: Backend, M: Module<B>>(
    module: &M,
    path: &Path,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    save_module_subset(module, path, metadata, None)
}

/// [`save_module`] of the parameters whose paths are in `keep` (all when `None`).
pub fn save_module_subset<B: Backend, M: Module<B>>(
    module: &M,
    path: &Path,
    metadata: BTreeMap<String, String>,
    keep: Option<&std::collections::HashSet<String>>,
) -> Result<()> {
    let infos = param_infos(module);
    let flats = flat_params(module);
    let tensors = flats
        .into_iter()
        .zip(infos)
        .filter(|((p, _), _)| keep.is_none_or(|k| k.contains(p)))
        .map(|((p, t), info)| (p, t, info.shape))
        .collect();
    write_tensors(path, tensors, metadata)
}

/// The paths of `module`'s trainable parameters.
pub fn trainable_paths<B: Backend, M: Module<B>>(module: &M) -> std::collections::HashSet<String> {
    param_infos(module)
        .into_iter()
        .filter(|i| i.trainable)
        .map(|i| i.path)
        .collect()
}

/// Checks that the file holds exactly the module's parameters with the same shapes; the error
/// lists every missing, unexpected and shape-mismatched key.
fn check_keys(infos: &[ParamInfo], st: &safetensors::SafeTensors<'_>, path: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let names: std::collections::BTreeSet<String> =
        st.names().into_iter().map(str::to_string).collect();
    for info in infos {
        match st.tensor(&info.path) {
            Err(_) => problems.push(format!("missing `{}`", info.path)),
            Ok(view) if view.shape() != info.shape.as_slice() => problems.push(format!(
                "`{}`: shape {:?} in file, {:?} in module",
                info.path,
                view.shape(),
                info.shape
            )),
            Ok(_) => {}
        }
    }
    let known: std::collections::BTreeSet<&str> = infos.iter().map(|i| i.path.as_str()).collect();
    for n in &names {
        if !known.contains(n.as_str()) {
            problems.push(format!("unexpected `{n}`"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TrainError::StateMismatch {
            path: path.to_path_buf(),
            message: format!("weights do not match the module: {}", problems.join("; ")),
        })
    }
}

/// Loads weights written by [`save_module`] into `module` (strict: every parameter must be
/// present with its shape, and the file may hold nothing else). Each parameter keeps its
/// `ParamId`, its dtype (the file's values are cast to it) and its `require_grad` flag.
pub fn load_module<B: Backend, M: Module<B>>(module: M, path: &Path) -> Result<M> {
    let file = TensorFile::read(path)?;
    load_module_from(module, &file, None)
}

/// [`load_module`] of a file written by [`save_module_subset`] with `keep`: exactly those
/// parameters must be there; the others keep the values `module` has.
pub fn load_module_subset<B: Backend, M: Module<B>>(
    module: M,
    path: &Path,
    keep: &std::collections::HashSet<String>,
) -> Result<M> {
    let file = TensorFile::read(path)?;
    load_module_from(module, &file, Some(keep))
}

pub(crate) fn load_module_from<B: Backend, M: Module<B>>(
    module: M,
    file: &TensorFile,
    keep: Option<&std::collections::HashSet<String>>,
) -> Result<M> {
    let st = file.parse()?;
    let infos: Vec<ParamInfo> = param_infos(&module)
        .into_iter()
        .filter(|i| keep.is_none_or(|k| k.contains(&i.path)))
        .collect();
    check_keys(&infos, &st, &file.path)?;

    struct L<'a, 'b> {
        stack: PathStack,
        st: &'a safetensors::SafeTensors<'b>,
        path: &'a Path,
        keep: Option<&'a std::collections::HashSet<String>>,
        error: Option<TrainError>,
    }
    impl<B: Backend> ModuleMapper<B> for L<'_, '_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let key = self.stack.path();
            if self.keep.is_some_and(|k| !k.contains(&key)) {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let loaded = self
                .st
                .tensor(&key)
                .map_err(|e| TrainError::StateMismatch {
                    path: self.path.to_path_buf(),
                    message: format!("`{key}`: {e}"),
                })
                .and_then(|view| view_to_data(self.path, &key, &view));
            let tensor = match loaded {
                Ok(data) => {
                    let dtype = tensor.dtype();
                    let device = tensor.device();
                    let data = if data.dtype == dtype {
                        data
                    } else {
                        data.convert_dtype(dtype)
                    };
                    let new = Tensor::<B, D>::from_data(data, (&device, dtype));
                    if tensor.is_require_grad() {
                        new.require_grad()
                    } else {
                        new
                    }
                }
                Err(e) => {
                    self.error.get_or_insert(e);
                    tensor
                }
            };
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    let mut l = L {
        stack: PathStack::default(),
        st: &st,
        path: &file.path,
        keep,
        error: None,
    };
    let module = module.map(&mut l);
    match l.error {
        Some(e) => Err(e),
        None => Ok(module),
    }
}
