/* PID 1 of the machine that scripts/under-bochs.sh boots: sets the environment from
   /t/env (K=V lines), runs each command line of /t/list ("[K=V ...] /path args...": leading K=V
   words are set for that program only), prints a result line per program on the console (the
   emulated serial port), then powers the emulator off. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
static void power_off(void) {
    /* Bochs quits on "Shutdown" written to port 0x8900; elsewhere the reboot call does. */
    if (ioperm(0x8900, 1, 1) == 0) { const char *s = "Shutdown"; while (*s) outb(*s++, 0x8900); }
    reboot(RB_POWER_OFF);
}
int main(void) {
    mkdir("/proc", 0755); mkdir("/sys", 0755); mkdir("/dev", 0755); mkdir("/tmp", 01777);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
    setenv("PATH", "/t", 1); setenv("HOME", "/tmp", 1); setenv("TMPDIR", "/tmp", 1);
    char line[8192];
    FILE *env = fopen("/t/env", "r"); /* K=V lines */
    while (env && fgets(line, sizeof line, env)) {
        line[strcspn(line, "\n")] = 0;
        char *eq = strchr(line, '=');
        if (eq) { *eq = 0; setenv(line, eq + 1, 1); }
    }
    if (env) fclose(env);
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f)) if (!strncmp(line, "flags", 5)) { fputs(line, stdout); break; }
    if (f) fclose(f);
    FILE *list = fopen("/t/list", "r");
    char cmd[4096];
    int failed = 0;
    while (list && fgets(cmd, sizeof cmd, list)) {
        cmd[strcspn(cmd, "\n")] = 0;
        if (!cmd[0]) continue;
        char *words[64]; int n = 0;
        for (char *tok = strtok(cmd, " "); tok && n < 63; tok = strtok(NULL, " ")) words[n++] = tok;
        words[n] = NULL;
        int nenv = 0; /* leading K=V words: this program's own environment */
        while (nenv < n && words[nenv][0] != '/' && strchr(words[nenv], '=')) nenv++;
        if (nenv == n) { printf("DYNQ-RESULT no program on the line: %s\n", cmd); failed = 1; continue; }
        char **argv = words + nenv;
        printf("DYNQ-RUN");
        for (int i = 0; i <= nenv; i++) printf(" %s", words[i]);
        printf("\n"); fflush(stdout);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        pid_t pid = fork();
        if (pid == 0) {
            /* Output goes to a file first: the serial console is slow (a C test program's
               570 PASS lines took seconds of emulated time). */
            FILE *log = freopen("/tmp/program.log", "w", stdout);
            if (log) dup2(fileno(log), STDERR_FILENO);
            for (int i = 0; i < nenv; i++) putenv(words[i]);
            execv(argv[0], argv); perror("execv"); _exit(127);
        }
        int st = 0; waitpid(pid, &st, 0);
        FILE *log = fopen("/tmp/program.log", "r"); /* to the console, but for "PASS" lines */
        while (log && fgets(line, sizeof line, log)) if (strncmp(line, "PASS ", 5)) fputs(line, stdout);
        if (log) fclose(log);
        int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (rc) failed = 1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("DYNQ-RESULT");
        for (int i = 0; i <= nenv; i++) printf(" %s", words[i]);
        printf(" %d (%.1f s emulated)\n", rc, (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
        fflush(stdout);
    }
    printf("DYNQ-INIT-DONE %s\n", failed ? "FAILED" : "ok"); fflush(stdout);
    /* The console is a serial port: let it send everything before the machine goes. */
    tcdrain(STDOUT_FILENO); sleep(2);
    sync(); power_off();
    return 0;
}
