// Fused kernels for the ops of src/kernels. Every kernel computes in f32; each has an f32, f16 and bf16
// entry point named `<kernel>_<dtype>` (see the INSTANTIATE macro at the end).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float x) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    x = warp_sum(x);
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    x = lane < blockDim.x / 32 ? partial[lane] : 0.0f;
    x = warp_sum(x);
    __syncthreads();
    return x;
}

// One block per row of n. With `branch`: the new residual = residual + scale * branch (rounded to T)
// is written and normalized; without: residual itself. normed = res / rms(res) * weight.
template <typename T>
__device__ void add_rms_norm(const T *residual, const T *branch, const T *weight, T *out, uint32_t n,
                             float scale, float eps) {
    const size_t row = blockIdx.x;
    const T *x = residual + row * n;
    const T *br = branch ? branch + row * n : nullptr;
    T *r = out + row * n;
    if (br) out += (size_t)gridDim.x * n; // out holds the new residual rows, then the normed ones
    float sum2 = 0.0f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = to_f32(x[i]);
        if (br) {
            T rounded = from_f32<T>(v + scale * to_f32(br[i]));
            r[i] = rounded;
            v = to_f32(rounded);
        }
        sum2 += v * v;
    }
    const float inv = rsqrtf(block_sum(sum2) / n + eps);
    const T *src = br ? r : x; // each thread reads back only what it wrote
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        out[row * n + i] = from_f32<T>(to_f32(src[i]) * inv * to_f32(weight[i]));
}

// gate_up rows of 2n: out = silu(gate) * up, rows of n.
template <typename T> __device__ void swiglu(const T *gate_up, T *out, size_t rows, uint32_t n) {
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < rows * n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t row = idx / n, col = idx % n;
        const float g = to_f32(gate_up[row * 2 * n + col]), u = to_f32(gate_up[row * 2 * n + n + col]);
        out[idx] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}

// src (b, h, t, d) with strides s0..s2 (last 1) -> dst (b, h, cap, d) contiguous at positions
// pos..pos + t, rotate-half RoPE applied when `rotate`. cos, sin: (t_cs, d / 2) or, `cs_batched`,
// (b, t_cs, d / 2), contiguous. One thread per (row, pair).
template <typename T>
__device__ void rope_write(const T *src, T *dst, const T *cos, const T *sin, uint32_t b, uint32_t h,
                           uint32_t t, uint32_t d, size_t s0, size_t s1, size_t s2, uint32_t cap,
                           uint32_t pos, uint32_t t_cs, int cs_batched, int rotate) {
    const uint32_t half = d / 2;
    const size_t total = (size_t)b * h * t * half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const uint32_t i = idx % half;
        const size_t row = idx / half;
        const uint32_t ti = row % t, hi = (row / t) % h, bi = row / ((size_t)t * h);
        const T *x = src + bi * s0 + hi * s1 + ti * s2;
        T *y = dst + (((size_t)bi * h + hi) * cap + pos + ti) * d;
        const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
        if (rotate) {
            const size_t c = ((cs_batched ? (size_t)bi * t_cs : 0) + ti) * half + i;
            const float co = to_f32(cos[c]), si = to_f32(sin[c]);
            y[i] = from_f32<T>(x1 * co - x2 * si);
            y[i + half] = from_f32<T>(x2 * co + x1 * si);
        } else {
            y[i] = x[i];
            y[i + half] = x[i + half];
        }
    }
}

#define ATTN_MAX_D 256
#define ATTN_WARPS 4
#define ATTN_GROUP 8

// Flash-decoding, one query per (batch, head). Grid (b * nkv * head_blocks, splits), block ATTN_WARPS
// warps: a block takes one kv head and up to ATTN_GROUP of the query heads that share it (head_blocks
// = ceil(group / ATTN_GROUP) blocks per kv head), so it reads each cached row once for all of them.
// Split s covers keys [s * chunk, min(len, (s + 1) * chunk)); each warp takes every ATTN_WARPS-th
// key with an online softmax per head, lanes splitting the head dim. With one split the block
// writes `out`; otherwise it writes (max, sum, acc[d]) per head to `partial` for attention_combine.
// q (b, nh, d) strides q0, q1; caches (b, nkv, cap, d) strides c0, c1, c2 (last 1).
template <typename T>
__device__ void decode_attention(const T *q, const T *k, const T *v, T *out, float *partial,
                                 uint32_t nh, uint32_t nkv, uint32_t d, size_t q0, size_t q1,
                                 size_t c0, size_t c1, size_t c2, uint32_t len, uint32_t chunk,
                                 float scale) {
    constexpr int PER_LANE = ATTN_MAX_D / 32;
    __shared__ float s_q[ATTN_GROUP][ATTN_MAX_D];
    __shared__ float s_m[ATTN_WARPS][ATTN_GROUP], s_l[ATTN_WARPS][ATTN_GROUP];
    __shared__ float s_acc[ATTN_WARPS][ATTN_GROUP][ATTN_MAX_D];
    const uint32_t group = nh / nkv, head_blocks = (group + ATTN_GROUP - 1) / ATTN_GROUP;
    const uint32_t bi = blockIdx.x / (nkv * head_blocks), kvh = blockIdx.x / head_blocks % nkv;
    const uint32_t h0 = kvh * group + blockIdx.x % head_blocks * ATTN_GROUP; // the block's first head
    const uint32_t heads = min(ATTN_GROUP, (kvh + 1) * group - h0);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (uint32_t x = threadIdx.x; x < heads * d; x += blockDim.x)
        s_q[x / d][x % d] = to_f32(q[bi * q0 + (h0 + x / d) * q1 + x % d]) * scale;
    __syncthreads();
    const T *kb = k + bi * c0 + kvh * c1, *vb = v + bi * c0 + kvh * c1;
    const uint32_t start = blockIdx.y * chunk, end = min(len, start + chunk);
    float m[ATTN_GROUP], l[ATTN_GROUP], acc[ATTN_GROUP][PER_LANE];
#pragma unroll
    for (int g = 0; g < ATTN_GROUP; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) acc[g][j] = 0.0f;
    }
    for (uint32_t p = start + warp; p < end; p += ATTN_WARPS) {
        const T *kr = kb + p * c2, *vr = vb + p * c2;
        float kx[PER_LANE], vx[PER_LANE];
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) {
            const uint32_t i = lane + 32 * j;
            kx[j] = i < d ? to_f32(kr[i]) : 0.0f;
            vx[j] = i < d ? to_f32(vr[i]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < ATTN_GROUP; g++) {
            if (g >= heads) break; // the same for the whole block
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < PER_LANE; j++) {
                const uint32_t i = lane + 32 * j;
                if (i < d) s += s_q[g][i] * kx[j];
            }
            s = warp_sum(s);
            const float m_new = fmaxf(m[g], s), corr = expf(m[g] - m_new), e = expf(s - m_new);
            l[g] = l[g] * corr + e;
#pragma unroll
            for (int j = 0; j < PER_LANE; j++) acc[g][j] = acc[g][j] * corr + e * vx[j];
            m[g] = m_new;
        }
    }
#pragma unroll
    for (int g = 0; g < ATTN_GROUP; g++) {
        if (lane == 0) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) {
            const uint32_t i = lane + 32 * j;
            if (i < d) s_acc[warp][g][i] = acc[g][j];
        }
    }
    __syncthreads();
    // Merge the warps per head: a warp that saw no key has m = -inf and weight 0.
    for (uint32_t x = threadIdx.x; x < heads * d; x += blockDim.x) {
        const uint32_t g = x / d, i = x % d;
        float mb = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++) mb = fmaxf(mb, s_m[w][g]);
        float lb = 0.0f, a = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            const float wt = s_m[w][g] == -INFINITY ? 0.0f : expf(s_m[w][g] - mb);
            lb += s_l[w][g] * wt;
            a += s_acc[w][g][i] * wt;
        }
        const size_t bh = (size_t)bi * nh + h0 + g, o = bh * gridDim.y + blockIdx.y;
        if (gridDim.y == 1) {
            out[bh * d + i] = from_f32<T>(a / lb);
        } else {
            partial[o * (d + 2) + 2 + i] = a;
            if (i == 0) { partial[o * (d + 2)] = mb; partial[o * (d + 2) + 1] = lb; }
        }
    }
}

// Merges the `splits` partial results of each (batch, head): one block per (batch, head).
template <typename T>
__device__ void attention_combine(const float *partial, T *out, uint32_t d, uint32_t splits) {
    const size_t bh = blockIdx.x;
    const float *p = partial + bh * splits * (d + 2);
    float mx = -INFINITY;
    for (uint32_t s = 0; s < splits; s++) mx = fmaxf(mx, p[s * (d + 2)]);
    float l = 0.0f;
    for (uint32_t s = 0; s < splits; s++) l += p[s * (d + 2) + 1] * expf(p[s * (d + 2)] - mx);
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.0f;
        for (uint32_t s = 0; s < splits; s++) a += p[s * (d + 2) + 2 + i] * expf(p[s * (d + 2)] - mx);
        out[bh * d + i] = from_f32<T>(a / l);
    }
}

// Greedy decoding's pick from n f32 logits: out[0] = the first index of the largest value (NaN
// never wins), out[1] = 1 if every value is finite. One block of 1024 threads.
__device__ __forceinline__ void keep_first_max(float &best, uint32_t &at, float v, uint32_t i) {
    if (v > best || (v == best && i < at)) { best = v; at = i; }
}

extern "C" __global__ void greedy_f32(const float *x, uint32_t n, uint32_t *out) {
    __shared__ float s_best[32];
    __shared__ uint32_t s_at[32];
    float best = -INFINITY;
    uint32_t at = UINT32_MAX;
    int finite = 1;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        finite &= isfinite(x[i]);
        keep_first_max(best, at, x[i], i);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        keep_first_max(best, at, __shfl_xor_sync(0xffffffff, best, o), __shfl_xor_sync(0xffffffff, at, o));
    if (lane == 0) { s_best[warp] = best; s_at[warp] = at; }
    finite = __syncthreads_and(finite);
    if (warp == 0) {
        best = lane < blockDim.x / 32 ? s_best[lane] : -INFINITY;
        at = lane < blockDim.x / 32 ? s_at[lane] : UINT32_MAX;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            keep_first_max(best, at, __shfl_xor_sync(0xffffffff, best, o), __shfl_xor_sync(0xffffffff, at, o));
        if (lane == 0) { out[0] = at == UINT32_MAX ? 0 : at; out[1] = finite; }
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                     \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T *residual, const T *branch,          \
                                                     const T *weight, T *out, uint32_t n,          \
                                                     float scale, float eps) {                     \
        add_rms_norm<T>(residual, branch, weight, out, n, scale, eps);                             \
    }                                                                                              \
    extern "C" __global__ void swiglu_##SUFFIX(const T *gate_up, T *out, size_t rows, uint32_t n) { \
        swiglu<T>(gate_up, out, rows, n);                                                          \
    }                                                                                              \
    extern "C" __global__ void rope_write_##SUFFIX(                                                \
        const T *src, T *dst, const T *cos, const T *sin, uint32_t b, uint32_t h, uint32_t t,      \
        uint32_t d, size_t s0, size_t s1, size_t s2, uint32_t cap, uint32_t pos, uint32_t t_cs,    \
        int cs_batched, int rotate) {                                                              \
        rope_write<T>(src, dst, cos, sin, b, h, t, d, s0, s1, s2, cap, pos, t_cs, cs_batched,      \
                      rotate);                                                                     \
    }                                                                                              \
    extern "C" __global__ void decode_attention_##SUFFIX(                                          \
        const T *q, const T *k, const T *v, T *out, float *partial, uint32_t nh, uint32_t nkv,     \
        uint32_t d, size_t q0, size_t q1, size_t c0, size_t c1, size_t c2, uint32_t len,           \
        uint32_t chunk, float scale) {                                                             \
        decode_attention<T>(q, k, v, out, partial, nh, nkv, d, q0, q1, c0, c1, c2, len, chunk,     \
                            scale);                                                                \
    }                                                                                              \
    extern "C" __global__ void attention_combine_##SUFFIX(const float *partial, T *out, uint32_t d, \
                                                          uint32_t splits) {                       \
        attention_combine<T>(partial, out, d, splits);                                             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
