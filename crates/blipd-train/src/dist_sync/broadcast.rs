//! The initial-weights broadcast of [`super::DistSync::broadcast_module`]: rank 0 streams every
//! parameter in frames, the other ranks replace theirs in the same visiting order.

use burn::module::{ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::DistSync;
use crate::error::{Result, TrainError};
use crate::params::PathStack;

/// Rank 0: appends each parameter to the pending frame and broadcasts full frames; other ranks:
/// receive frames as needed and take parameters from them in the same visiting order.
pub(super) struct BroadcastMapper<'a, B: Backend> {
    pub(super) sync: &'a mut DistSync,
    pub(super) op: String,
    pub(super) cap: usize,
    pub(super) stack: PathStack,
    pub(super) pending: Vec<u8>,
    pub(super) queue: std::collections::VecDeque<Vec<u8>>,
    pub(super) error: Option<TrainError>,
    pub(super) bytes: usize,
    pub(super) _b: std::marker::PhantomData<B>,
}

impl<B: Backend> BroadcastMapper<'_, B> {
    pub(super) fn next_bytes(&mut self) -> Result<Vec<u8>> {
        while self.queue.is_empty() {
            let frame = self
                .sync
                .rv
                .broadcast(&[], &self.op)
                .map_err(|e| self.sync.err(e))?;
            self.bytes += frame.len();
            let mut rest = frame.as_slice();
            while !rest.is_empty() {
                if rest.len() < 8 {
                    return Err(TrainError::Sync(format!("{}: truncated frame", self.op)));
                }
                let n = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default()) as usize;
                if rest.len() < 8 + n {
                    return Err(TrainError::Sync(format!("{}: truncated frame", self.op)));
                }
                self.queue.push_back(rest[8..8 + n].to_vec());
                rest = &rest[8 + n..];
            }
        }
        Ok(self.queue.pop_front().unwrap_or_default())
    }
}

impl<B: Backend> ModuleMapper<B> for BroadcastMapper<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.enter(name);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        if self.sync.rv.world.rank == 0 {
            let data = tensor.clone().into_data();
            let bytes = data.as_bytes();
            self.pending
                .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            self.pending.extend_from_slice(bytes);
            if self.pending.len() >= self.cap {
                let frame = std::mem::take(&mut self.pending);
                self.bytes += frame.len();
                if let Err(e) = self.sync.rv.broadcast(&frame, &self.op) {
                    self.error = Some(self.sync.err(e));
                }
            }
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let tensor = match self.next_bytes() {
            Ok(bytes) => {
                let (shape, dtype, device) = (tensor.dims(), tensor.dtype(), tensor.device());
                let expected = shape.iter().product::<usize>() * dtype.size();
                if bytes.len() != expected {
                    self.error = Some(TrainError::Sync(format!(
                        "rank {}: {}: `{}` got {} bytes from rank 0, expected {expected}",
                        self.sync.rv.world.rank,
                        self.op,
                        self.stack.path(),
                        bytes.len()
                    )));
                    tensor
                } else {
                    let data = TensorData::from_bytes_vec(bytes, shape, dtype);
                    let new = Tensor::<B, D>::from_data(data, (&device, dtype));
                    if tensor.is_require_grad() {
                        new.require_grad()
                    } else {
                        new
                    }
                }
            }
            Err(e) => {
                self.error = Some(e);
                tensor
            }
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}
