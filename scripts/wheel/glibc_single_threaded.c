/* Linked into the modules only by scripts/build_wheel.sh, which links against glibc 2.28.
 * GCC 12's libstdc++ (its headers and libstdc++.a) reads glibc's __libc_single_threaded (new in
 * glibc 2.32) to skip atomic reference counts while a process has one thread. This hidden
 * copy says "maybe several threads" forever: the atomics are always used, which is always
 * correct, and the modules load on glibc 2.28. */
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
