"""Compile triton_conv.py's kernels for a GPU on any machine (no GPU needed) and print what each one uses per
program: registers, spills to local memory, shared memory. Registers decide how many programs an SM runs at
once; a spill is slow memory traffic. It also catches what Triton's interpreter lets through but the compiler
refuses.

    python speed/kernel_resources.py              # sm_90 (H100, H200), 4 warps
    python speed/kernel_resources.py --arch 80 --warps 4 8
"""
import argparse
import os
import subprocess
import sys
import tempfile

if os.environ.get('TRITON_INTERPRET') == '1':
    sys.exit('TRITON_INTERPRET=1 makes Triton interpret its kernels instead of compiling them: unset it')

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # net.py, which triton_conv imports
import triton_conv as tc  # noqa: E402

F32, I32, F, I64 = '*fp32', 'i32', 'fp32', '*i64'
BEGIN = dict(x_ptr=F32, sn=I32, sk=I32, sh=I32, sw=I32, w_ptr=F32)
BASIC = dict(C=6, S=14, CPAD=8, BLOCK=256)
BASIC_CONV = dict(x_ptr=F32, w_ptr=F32, a_ptr=F32, b_ptr=F32, z_ptr=F32, mom_ptr=F32, K=I32)
# kernel -> (argument types, constexprs) at generation's shapes
KERNELS = {
    'conv3x3 forward 1->6 28x28': (tc._conv3x3_kernel, dict(x_ptr=F32, w_ptr=F32, y_ptr=F32, groups=I32),
                                   dict(CIN=1, COUT=6, H=28, W=28, BLOCK=1024, CPAD=8)),
    'conv3x3 forward 6->6 14x14': (tc._conv3x3_kernel, dict(x_ptr=F32, w_ptr=F32, y_ptr=F32, groups=I32),
                                   dict(CIN=6, COUT=6, H=14, W=14, BLOCK=256, CPAD=8)),
    'conv3x3 weight gradient 6->6': (tc._conv3x3_wgrad_kernel, dict(x_ptr=F32, dy_ptr=F32, part_ptr=F32,
                                                                    n_images=I32, groups=I32, per_block=I32),
                                     dict(CIN=6, COUT=6, H=14, W=14, BLOCK=256, CHUNK=256, CPAD=tc.OUT_PAD)),
    'fused Begin: statistics': (tc._begin_stats_kernel, dict(**BEGIN, mom_ptr=F32, zx_ptr=F32, xs_ptr=F32, K=I32),
                                dict(C=6, H=28, W=28, CPAD=8, BLOCK=1024, CHUNK=256)),
    'fused Begin: forward': (tc._begin_pool_kernel, dict(**BEGIN, scale_ptr=F32, shift_ptr=F32, y_ptr=F32, K=I32),
                             dict(C=6, H=28, W=28, CPAD=8, BLOCK=256)),
    'fused Begin: backward': (tc._begin_grad_kernel, dict(**BEGIN, scale_ptr=F32, shift_ptr=F32, mean_ptr=F32,
                                                          rstd_ptr=F32, dy_ptr=F32, sums_ptr=F32, gx_ptr=F32, K=I32),
                              dict(C=6, H=28, W=28, CPAD=8, BLOCK=256)),
    'fused Basic: conv1': (tc._basic_conv_kernel, BASIC_CONV, dict(NORM=False, **BASIC)),
    'fused Basic: BN1, ReLU, conv2': (tc._basic_conv_kernel, BASIC_CONV, dict(NORM=True, **BASIC)),
    'fused Basic: output, Last conv': (tc._basic_out_kernel, dict(h_ptr=F32, z_ptr=F32, a_ptr=F32, b_ptr=F32,
                                                                   wd_ptr=F32, d_ptr=F32, K=I32),
                                       dict(C=6, OUT=12, S=14)),
    'fused Basic: back to BN2': (tc._basic_out_grad_kernel, dict(h_ptr=F32, z_ptr=F32, a_ptr=F32, b_ptr=F32,
                                                                 stats_ptr=F32, wd_ptr=F32, dd_ptr=F32, g_ptr=F32,
                                                                 sums_ptr=F32, gwd_ptr=F32, K=I32),
                                 dict(C=6, OUT=12, S=14)),
    'fused Basic: back to BN1': (tc._basic_mid_grad_kernel, dict(z1_ptr=F32, a_ptr=F32, b_ptr=F32, stats_ptr=F32,
                                                                 z2_ptr=F32, g_ptr=F32, coef_ptr=F32, w2t_ptr=F32,
                                                                 dz_ptr=F32, gw_ptr=F32, da_ptr=F32, sums_ptr=F32,
                                                                 K=I32), BASIC),
    'fused Basic: back to input': (tc._basic_in_grad_kernel, dict(h_ptr=F32, z1_ptr=F32, da_ptr=F32, coef_ptr=F32,
                                                                  w1t_ptr=F32, g_ptr=F32, dz_ptr=F32, gw_ptr=F32,
                                                                  dh_ptr=F32, K=I32), BASIC),
    'fused small step': (tc._small_step_kernel, dict(h_ptr=F32, off_ptr=I64, label_ptr=I64, w1_ptr=F32, w2_ptr=F32,
                                                     dw_ptr=F32, scale_ptr=F32, shift_ptr=F32, fcw_ptr=F32,
                                                     fcb_ptr=F32, loss_ptr=F32, g1_ptr=F32, g2_ptr=F32, hid_ptr=F32,
                                                     grad_ptr=F32, K=I32, inv_batch=F),
                         dict(C=6, HID=3, OUT=12, CLASSES=10, S=14)),
}


def resources(cubin):
    """cuobjdump's resource line of a compiled kernel (REG, STACK, SHARED, LOCAL, ...)."""
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, '--dump-resource-usage', f.name], capture_output=True, text=True, check=True).stdout
    return next(line.split(':', 1)[1].strip() if line.startswith('Function') else line.strip()
                for line in out.splitlines() if 'REG:' in line)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', type=int, default=90, help='CUDA compute capability x 10 (90: H100/H200, 80: A100)')
    p.add_argument('--warps', type=int, nargs='+', default=[4], help='num_warps to compile with (Triton: 4)')
    args = p.parse_args()
    target = GPUTarget('cuda', args.arch, 32)
    print(f'triton {triton.__version__}, sm_{args.arch}')
    for name, (fn, signature, constexprs) in KERNELS.items():
        for warps in args.warps:
            source = triton.compiler.ASTSource(fn, signature={**signature, **dict.fromkeys(constexprs, 'constexpr')},
                                               constexprs=constexprs)
            kernel = triton.compile(source, target=target, options={'num_warps': warps})
            print(f'{name:30s} {warps} warps: {resources(kernel.asm["cubin"])}', flush=True)


if __name__ == '__main__':
    main()
