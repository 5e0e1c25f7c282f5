//! One sequence's Mamba2 state: per Mamba layer a convolution window and an SSM state, f32. A
//! state cannot drop positions as a KV cache does, so copies of it are kept at some lengths
//! (checkpoints), and going back means going back to one of those (or to the start).

/// The sizes of one layer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateShape {
    /// Mamba layers.
    pub layers: usize,
    /// Values of a convolution window, and of an SSM state.
    pub window: usize,
    pub ssm: usize,
}

impl StateShape {
    /// Bytes of one sequence's state, every Mamba layer.
    pub fn bytes(&self) -> usize {
        self.layers * (self.window + self.ssm) * std::mem::size_of::<f32>()
    }
}

/// One layer's state after some positions.
#[derive(Clone)]
pub struct LayerState {
    pub window: Vec<f32>,
    pub ssm: Vec<f32>,
}

impl LayerState {
    /// The state before any position.
    pub fn zeros(shape: StateShape) -> Self {
        Self { window: vec![0.0; shape.window], ssm: vec![0.0; shape.ssm] }
    }
}

/// Checkpoints kept per sequence, the most recent ones.
pub const CHECKPOINTS: usize = 4;

pub struct SsmStates {
    shape: StateShape,
    /// Each layer's state after every filled position.
    layers: Vec<LayerState>,
    /// Written by the forward in progress, per layer: the state after its last token and, for a
    /// forward of several tokens, after all but the last.
    pending: Vec<Option<(LayerState, Option<LayerState>)>>,
    /// Per layer, the buffers of the state a commit replaced, which the next forward writes
    /// into (a state is megabytes: allocating it every token costs page faults).
    spare: Vec<Option<LayerState>>,
    /// (length, every layer's state after that many positions), oldest first.
    checkpoints: Vec<(usize, Vec<LayerState>)>,
}

/// A copy has the states and checkpoints, not the spare buffers.
impl Clone for SsmStates {
    fn clone(&self) -> Self {
        Self {
            shape: self.shape,
            layers: self.layers.clone(),
            pending: self.pending.clone(),
            spare: vec![None; self.shape.layers],
            checkpoints: self.checkpoints.clone(),
        }
    }
}

impl SsmStates {
    pub fn new(shape: StateShape) -> Self {
        let layers = vec![LayerState::zeros(shape); shape.layers];
        let (pending, spare) = (vec![None; shape.layers], vec![None; shape.layers]);
        Self { shape, layers, pending, spare, checkpoints: Vec::new() }
    }

    pub fn shape(&self) -> StateShape {
        self.shape
    }

    /// Layer `layer`'s state after the filled positions.
    pub fn layer(&self, layer: usize) -> &LayerState {
        &self.layers[layer]
    }

    /// `layer`'s state, and a buffer for a forward to write the next one into: a spare one (of
    /// the state an earlier commit replaced) where there is one.
    pub fn with_buffer(&mut self, layer: usize) -> (&LayerState, LayerState) {
        let buffer = self.spare[layer].take().unwrap_or_else(|| LayerState::zeros(self.shape));
        (&self.layers[layer], buffer)
    }

    /// What the forward in progress leaves in `layer`; kept once it ends (`commit`).
    pub fn set_pending(&mut self, layer: usize, last: LayerState, before_last: Option<LayerState>) {
        self.pending[layer] = Some((last, before_last));
    }

    /// Takes the pending states of a forward of `t` tokens that ended at length `len`; a prompt
    /// (t > 1) leaves checkpoints at len - 1 and len, which a follow-up that shares the prompt
    /// (or all of it but its last token) goes back to.
    /// Without a forward's states for every layer (positions marked filled by hand), the states
    /// stay as they are.
    pub fn commit(&mut self, len: usize, t: usize) {
        let pending: Option<Vec<_>> = self.pending.iter_mut().map(Option::take).collect();
        let Some(pending) = pending else { return };
        let mut before = Vec::new();
        for ((layer, spare), (last, before_last)) in self.layers.iter_mut().zip(&mut self.spare).zip(pending) {
            *spare = Some(std::mem::replace(layer, last));
            before.extend(before_last);
        }
        if t > 1 && before.len() == self.layers.len() {
            self.checkpoints.push((len - 1, before));
            self.checkpoints.push((len, self.layers.clone()));
            let excess = self.checkpoints.len().saturating_sub(CHECKPOINTS);
            self.checkpoints.drain(..excess);
        }
    }

    /// The longest length up to `n` that the state can go back to, from length `len`.
    pub fn restorable(&self, len: usize, n: usize) -> usize {
        if n >= len {
            return len;
        }
        self.checkpoints.iter().map(|(at, _)| *at).filter(|at| *at <= n).max().unwrap_or(0)
    }

    /// Goes back to length `restorable(len, n)`, and returns it.
    pub fn truncate(&mut self, len: usize, n: usize) -> usize {
        let to = self.restorable(len, n);
        if to < len {
            self.layers = match self.checkpoints.iter().find(|(at, _)| *at == to) {
                Some((_, layers)) => layers.clone(),
                None => vec![LayerState::zeros(self.shape); self.shape.layers],
            };
            self.checkpoints.retain(|(at, _)| *at <= to);
        }
        to
    }

    /// The lengths of the checkpoints, oldest first.
    pub fn checkpoints(&self) -> Vec<usize> {
        self.checkpoints.iter().map(|(at, _)| *at).collect()
    }
}
