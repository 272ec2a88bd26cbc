/* The installed dynq.h as a C program: compiled as C99 and C11 with -pedantic -Werror (see
 * CMakeLists.txt), linked against the shared library and run. Also the program that the
 * pkg-config test builds. */
#include <dynq.h>

#include <stdio.h>
#include <string.h>

int main(void)
{
    dynq_pack_config pc;
    dynq_gemm_config gc;
    dynq_packed_weights_info info;
    dynq_packed_weights *w = NULL;
    dynq_isa isa = DYNQ_ISA_AUTO;
    dynq_weight_layout layout = DYNQ_WEIGHT_LAYOUT_NK;
    const float weights[6] = {1.0f, -2.0f, 0.5f, 0.25f, 3.0f, -1.0f};
    const float a[3] = {1.0f, 2.0f, 3.0f};
    float y[2] = {0.0f, 0.0f};
    char msg[256];
    dynq_status st;
    int failed = 0;

    if (strcmp(dynq_version(), DYNQ_VERSION_STRING) != 0 || dynq_abi_version() != DYNQ_ABI_VERSION) {
        printf("FAIL version %s / ABI %u, header %s / ABI %d\n", dynq_version(), (unsigned)dynq_abi_version(),
               DYNQ_VERSION_STRING, DYNQ_ABI_VERSION);
        failed++;
    }
    (void)isa;
    if (dynq_pack_config_init(&pc) != DYNQ_STATUS_OK || dynq_gemm_config_init(&gc) != DYNQ_STATUS_OK) {
        printf("FAIL config init\n");
        failed++;
    }
    st = dynq_pack_weights(weights, 2, 3, layout, &pc, &w);
    if (st == DYNQ_STATUS_OK) {
        st = dynq_gemm(w, a, 1, 3, NULL, y, 2, &gc);
    }
    if (st == DYNQ_STATUS_OK) {
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        st = dynq_packed_weights_get_info(w, &info);
    }
    if (st != DYNQ_STATUS_OK) {
        dynq_last_error_message(msg, sizeof msg);
        printf("FAIL %s: %s\n", dynq_status_str(st), msg);
        failed++;
    } else if (info.n != 2 || info.k != 3 || y[0] == 0.0f) {
        printf("FAIL unexpected result n=%zu k=%zu y0=%g\n", info.n, info.k, (double)y[0]);
        failed++;
    }
    /* An error path: its message arrives through dynq_last_error_message. */
    if (dynq_pack_weights(weights, 0, 3, layout, NULL, &w) != DYNQ_STATUS_INVALID_ARGUMENT ||
        dynq_last_error_message(msg, sizeof msg) == 0 || w != NULL) {
        printf("FAIL n = 0 is not refused with a message\n");
        failed++;
    }
    dynq_packed_weights_free(w);
    printf("header_check (C, dynq %s, kernel %s): %d passed, %d failed\n", dynq_version(),
           info.kernel_name ? info.kernel_name : "?", failed ? 0 : 1, failed);
    return failed ? 1 : 0;
}
