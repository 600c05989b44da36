// The coupling step of ff-kernels' coupling.rs on CUDA: one thread block per
// pixel row (channels-last), threads over channels. Same formulas as the
// CPU's forward_rows / backward_rows:
//   th = tanh(k a_s), e = exp(clamp th), pre = [x1, x2 e + k a_t],
//   out[j] = pre[perm[j]] scale[perm[j]] + offset[perm[j]],
//   out[C] = carried + clamp sum(th).
// The global affine's gradients are summed per block in shared memory and
// added to the output with one atomicAdd per channel and block.

extern "C" __global__ void ff_coupling_forward(
    const float* __restrict__ x, int xs, int x_c,
    const float* __restrict__ a,
    const unsigned int* __restrict__ perm,
    const float* __restrict__ scale, const float* __restrict__ offset,
    float clamp, float k, int c, int pixels,
    float* __restrict__ out)
{
    extern __shared__ float sh[];
    const int c2 = c / 2, c1 = c - c2;
    float* pre = sh;          // [c]
    float* red = sh + c;      // [blockDim.x]
    for (int p = blockIdx.x; p < pixels; p += gridDim.x) {
        const float* xr = x + (long long)p * xs;
        const float* ar = a + (long long)p * 2 * c2;
        float local = 0.0f;
        for (int j = threadIdx.x; j < c1; j += blockDim.x) pre[j] = xr[j];
        for (int i = threadIdx.x; i < c2; i += blockDim.x) {
            float th = tanhf(k * ar[i]);
            local += th;
            pre[c1 + i] = xr[c1 + i] * expf(clamp * th) + k * ar[c2 + i];
        }
        red[threadIdx.x] = local;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
            __syncthreads();
        }
        float* o = out + (long long)p * (c + 1);
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            unsigned int q = perm[j];
            o[j] = pre[q] * scale[q] + offset[q];
        }
        if (threadIdx.x == 0) {
            float carried = x_c > c ? xr[c] : 0.0f;
            o[c] = carried + clamp * red[0];
        }
        __syncthreads();
    }
}

extern "C" __global__ void ff_coupling_backward(
    const float* __restrict__ x, int xs, int x_c,
    const float* __restrict__ a,
    const float* __restrict__ grad,
    const unsigned int* __restrict__ perm,
    const float* __restrict__ scale,
    float clamp, float k, int c, int pixels,
    float* __restrict__ gx, float* __restrict__ ga, float* __restrict__ g_affine)
{
    extern __shared__ float sh[];
    const int c2 = c / 2, c1 = c - c2;
    float* pre = sh;              // [c]
    float* gpre = sh + c;         // [c]
    float* th = sh + 2 * c;       // [c2]
    float* e = th + c2;           // [c2]
    float* acc = e + c2;          // [2 c]: scale gradients, then offset gradients
    for (int j = threadIdx.x; j < 2 * c; j += blockDim.x) acc[j] = 0.0f;
    __syncthreads();
    const float ds_factor = clamp * k;
    for (int p = blockIdx.x; p < pixels; p += gridDim.x) {
        const float* xr = x + (long long)p * xs;
        const float* ar = a + (long long)p * 2 * c2;
        const float* gr = grad + (long long)p * (c + 1);
        float* gxr = gx + (long long)p * x_c;
        float* gar = ga + (long long)p * 2 * c2;
        const float gl = gr[c];
        if (threadIdx.x == 0 && x_c > c) gxr[c] = gl;
        for (int j = threadIdx.x; j < c1; j += blockDim.x) pre[j] = xr[j];
        for (int i = threadIdx.x; i < c2; i += blockDim.x) {
            float t = tanhf(k * ar[i]);
            float ev = expf(clamp * t);
            th[i] = t;
            e[i] = ev;
            pre[c1 + i] = xr[c1 + i] * ev + k * ar[c2 + i];
        }
        __syncthreads();
        // Each output channel j has its own pre-permutation channel perm[j],
        // and thread j % blockDim.x always handles it: no races on acc.
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            unsigned int q = perm[j];
            float go = gr[j];
            gpre[q] = go * scale[q];
            acc[q] += go * pre[q];
            acc[c + q] += go;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < c1; j += blockDim.x) gxr[j] = gpre[j];
        for (int i = threadIdx.x; i < c2; i += blockDim.x) {
            float gp = gpre[c1 + i];
            gxr[c1 + i] = gp * e[i];
            float ds = gp * xr[c1 + i] * e[i] + gl;
            gar[i] = ds * ds_factor * (1.0f - th[i] * th[i]);
            gar[c2 + i] = k * gp;
        }
        __syncthreads();
    }
    for (int j = threadIdx.x; j < 2 * c; j += blockDim.x) atomicAdd(&g_affine[j], acc[j]);
}
