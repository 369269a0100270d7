//! Noise schedulers: DDPM (training), PNDM/PLMS and DDIM (sampling, inversion).
pub mod ddim;
pub mod ddpm;
pub mod pndm;
