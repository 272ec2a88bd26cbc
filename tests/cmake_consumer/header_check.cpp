// The installed dynq.h and dynq.hpp in C++: compiled as C++11, 14, 17 and 20 with -pedantic
// -Werror (see CMakeLists.txt), linked against the shared library and run.
#include <dynq.h>
#include <dynq.hpp>

#include <cstdio>
#include <string>
#include <type_traits>

static_assert(std::is_same<std::underlying_type<dynq_isa>::type, uint32_t>::value, "dynq_isa is uint32_t");
static_assert(!std::is_copy_constructible<dynq::packed_weights>::value, "packed_weights is move-only");
static_assert(std::is_nothrow_move_constructible<dynq::packed_weights>::value, "moves do not throw");

int main()
{
    int failed = 0;
    try {
        const float w[4] = {1.0f, 2.0f, 3.0f, 4.0f};
        dynq::packed_weights p = dynq::packed_weights::pack(w, 2, 2);
        std::vector<float> y = p.gemm(std::vector<float>{1.0f, -1.0f});
        if (y.size() != 2 || std::string(dynq::version()) != DYNQ_VERSION_STRING) {
            failed++;
        }
    } catch (const dynq::error &e) {
        std::printf("FAIL %s\n", e.what());
        failed++;
    }
    std::printf("header_check (C++%ld): %d passed, %d failed\n", static_cast<long>(__cplusplus), failed ? 0 : 1,
                failed);
    return failed ? 1 : 0;
}
