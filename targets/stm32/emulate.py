"""The generated C sources on an emulated Cortex-M: compile with arm-none-eabi-gcc, run under qemu-system-arm.

What this proves is that detector.c, built for the MCU with the MCU's float unit and C
library, decodes a stored model output into the same detections as pipeline/detect.py;
never anything about speed (qemu's timing is not the board's). The harness is a bare-metal
program of our own: a vector table, a reset handler that turns the FPU on, and semihosting
calls (the ARM-defined `bkpt 0xAB` interface) to read a request file and write a response
file in qemu's working directory. No newlib stdio, so nothing depends on rdimon's startup.

Machines: mps2-an386 (Cortex-M4F) and mps2-an500 (Cortex-M7), both with 4 MiB of RAM at
0x0 (code, data) and 4 MiB at 0x20000000 (bss, stack).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_deploy.pipeline.errors import DeployError, DeviceError, DeviceTimeout, InputError, ToolchainMissing

GCC, GXX, QEMU = "arm-none-eabi-gcc", "arm-none-eabi-g++", "qemu-system-arm"
APT_PACKAGES = ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm")


@dataclass(frozen=True)
class Core:
    name: str
    flags: tuple[str, ...]
    machine: str  # the qemu board that has this core


CORES = {
    "cortex-m4": Core("cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
                      "mps2-an386"),
    # fpv5-sp-d16, the FPU of the STM32F7x6 parts: the single-precision subset every M7 has.
    "cortex-m7": Core("cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-sp-d16"),
                      "mps2-an500"),
}

# -Wdouble-promotion: a float silently computed in double is software-emulated on these cores.
STRICT_C = ("-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wdouble-promotion",
            "-Wstrict-prototypes", "-Wconversion")
STRICT_CXX = ("-std=c++11", "-pedantic", "-Wall", "-Wextra", "-Werror")
OPTIMIZE = ("-O2", "-ffp-contract=off", "-ffunction-sections", "-fdata-sections")

REQUEST, RESPONSE = "request.bin", "response.bin"
MAGIC_REQUEST, MAGIC_RESPONSE = 0x31484445, 0x31524445  # "EDH1", "EDR1"
MODE_DECODE_INT8, MODE_DECODE_FLOAT, MODE_PREPROCESS, MODE_MODEL = 1, 2, 3, 4
MAX_FRAME_BYTES = 1 << 20
RAM_BYTES = 4 << 20
STACK_BYTES = 64 << 10


def missing(run: bool = True) -> str | None:
    """None when the sources can be compiled (and, with run, emulated) here, else why not."""
    for tool in (GCC, GXX):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install gcc-arm-none-eabi)"
    probe = subprocess.run([GCC, *CORES["cortex-m4"].flags, "-print-file-name=libm.a"], capture_output=True,
                           text=True)
    if probe.returncode != 0 or not Path(probe.stdout.strip()).is_absolute():
        return "newlib for arm-none-eabi is not installed (apt-get install libnewlib-arm-none-eabi)"
    if run and shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-arm)"
    return None


def _require(run: bool) -> None:
    reason = missing(run)
    if reason:
        raise ToolchainMissing(f"stm32 emulation impossible: {reason}")


def _compile(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
        raise DeployError(f"{command[0]} failed on {what}: {lines[0].strip()}")


def read_config(sources: Path) -> dict[str, int]:
    """The integer macros of detector_config.h (what the harness's buffers are sized from)."""
    values = {}
    for name, value in re.findall(r"^#define (DETECTOR_\w+) \(?(-?\d+)\)?$",
                                  (Path(sources) / "detector_config.h").read_text(), flags=re.M):
        values[name] = int(value)
    return values


def compile_sources(sources: Path, out_dir: Path, core: str = "cortex-m4") -> list[Path]:
    """Compiles every generated file except inference.cc (it needs TFLM) with warnings as errors."""
    _require(run=False)
    sources, out_dir = Path(sources), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = CORES[core].flags
    objects = []
    for name, compiler, strict in (("detector.c", GCC, STRICT_C), ("serial_probe.c", GCC, STRICT_C),
                                   ("model_data.cc", GXX, STRICT_CXX)):
        obj = out_dir / f"{Path(name).stem}.{core}.o"
        _compile([compiler, *flags, *OPTIMIZE, *strict, "-I", str(sources), "-c", str(sources / name), "-o",
                  str(obj)], f"{name} for {core}")
        objects.append(obj)
    return objects


def build_harness(sources: Path, work: Path, core: str = "cortex-m4") -> Path:
    """The harness ELF for `core`: generated detector.c and model_data.cc plus our startup and main."""
    sources, work = Path(sources), Path(work)
    objects = compile_sources(sources, work, core)
    (work / "harness.c").write_text(HARNESS_C)
    (work / "link.ld").write_text(LINKER_SCRIPT.format(stack=STACK_BYTES))
    elf = work / f"harness.{core}.elf"
    _compile([GCC, *CORES[core].flags, *OPTIMIZE, "-std=c99", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing",
              "-I", str(sources), str(work / "harness.c"), *map(str, objects), "-nostartfiles",
              "--specs=nosys.specs", "-T", str(work / "link.ld"), "-Wl,--gc-sections", "-lm", "-o", str(elf)],
             f"the emulation harness for {core}")
    return elf


def build_serial_board(sources: Path, work: Path, core: str = "cortex-m4") -> Path:
    """A firmware ELF that answers the serial transport on the emulated board's UART0 (serial_probe.c).

    The stand-in for TFLM's Invoke (TFLM cannot be built here) is the generated decode + NMS of detector.c
    on a fixed pseudo-random output: real work of the detector's own code, timed by the board's SysTick."""
    sources, work = Path(sources), Path(work)
    objects = compile_sources(sources, work, core)
    (work / "serial_board.c").write_text(SERIAL_BOARD_C)
    (work / "link.ld").write_text(LINKER_SCRIPT.format(stack=STACK_BYTES))
    elf = work / f"serial_board.{core}.elf"
    _compile([GCC, *CORES[core].flags, *OPTIMIZE, "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(sources),
              str(work / "serial_board.c"), *map(str, objects), "-nostartfiles", "--specs=nosys.specs", "-T",
              str(work / "link.ld"), "-Wl,--gc-sections", "-lm", "-o", str(elf)], f"the serial board for {core}")
    return elf


class SerialBoard:
    """The serial-board ELF running under qemu, its UART0 on a pseudo-terminal: `port` is what a `serial`
    device in devices.yaml would name. Used as a context manager; leaving it powers the board off."""

    def __init__(self, elf: Path, core: str = "cortex-m4", start_timeout: float = 10.0):
        _require(run=True)
        self.elf, self.core, self.start_timeout = Path(elf), CORES[core], start_timeout
        self.process: subprocess.Popen | None = None
        self.port = ""

    def __enter__(self) -> "SerialBoard":
        self.process = subprocess.Popen(
            [QEMU, "-M", self.core.machine, "-display", "none", "-monitor", "none", "-serial", "pty", "-kernel",
             str(self.elf)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # qemu names the pseudo-terminal it made on its first lines: "char device redirected to /dev/pts/N".
        deadline = time.monotonic() + self.start_timeout
        said = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            said.append(line.strip())
            found = re.search(r"redirected to (/dev/pts/\d+)", line)
            if found:
                self.port = found[1]
                return self
        self.__exit__(None, None, None)
        raise DeviceError(f"{self.core.machine} emulation gave no serial port: {' / '.join(said) or 'no output'}")

    def power_off(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        self.power_off()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


class Emulator:
    """Runs requests against one harness ELF under qemu-system-arm."""

    def __init__(self, elf: Path, sources: Path, core: str = "cortex-m4", timeout: float = 30.0):
        _require(run=True)
        self.elf, self.core, self.timeout = Path(elf), CORES[core], timeout
        self.config = read_config(sources)

    def _run(self, request: bytes) -> bytes:
        if len(request) > RAM_BYTES - STACK_BYTES - (1 << 20):
            raise InputError(f"emulation request of {len(request)} bytes does not fit the emulated board's RAM")
        with tempfile.TemporaryDirectory(prefix="stm32-qemu-") as tmp:
            (Path(tmp) / REQUEST).write_bytes(request)
            command = [QEMU, "-M", self.core.machine, "-nographic", "-semihosting-config", "enable=on,target=native",
                       "-kernel", str(self.elf)]
            try:
                done = subprocess.run(command, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise DeviceTimeout(f"{self.core.machine} emulation did not finish within {self.timeout:g} s") \
                    from None
            response = Path(tmp) / RESPONSE
            if done.returncode != 0 or not response.exists():
                said = (done.stdout + done.stderr).strip().splitlines() or [f"exit code {done.returncode}"]
                raise DeviceError(f"{self.core.machine} emulation failed: {said[-1].strip()}")
            data = response.read_bytes()
        magic, status = struct.unpack_from("<Ii", data)
        if magic != MAGIC_RESPONSE:
            raise DeviceError(f"{self.core.machine} emulation wrote no valid response")
        if status < 0:
            raise DeviceError(f"{self.core.machine} emulation: the C code returned error {status}")
        return data[8:]

    def decode(self, box_dist: np.ndarray, cls_logit: np.ndarray, *, conf: float, iou: float, max_det: int,
               agnostic: bool = False) -> np.ndarray:
        """Raw outputs in the model's layout (int8, or float32 already dequantized) -> detections (n, 6)."""
        c = self.config
        box_dist, cls_logit = np.asarray(box_dist), np.asarray(cls_logit)
        for name, array, channels in (("box_dist", box_dist, 4 * c["DETECTOR_REG_MAX"]),
                                      ("cls_logit", cls_logit, c["DETECTOR_NUM_CLASSES"])):
            if array.size != channels * c["DETECTOR_NUM_ANCHORS"]:
                raise InputError(f"{name} has {array.size} values; the config expects {channels} x "
                                 f"{c['DETECTOR_NUM_ANCHORS']}")
        if box_dist.dtype == np.int8 and cls_logit.dtype == np.int8:
            mode, payload = MODE_DECODE_INT8, box_dist.tobytes() + cls_logit.tobytes()
        else:
            mode = MODE_DECODE_FLOAT
            payload = box_dist.astype("<f4").tobytes() + cls_logit.astype("<f4").tobytes()
        header = struct.pack("<IIffii", MAGIC_REQUEST, mode, conf, iou, max_det, int(agnostic))
        data = self._run(header + payload)
        (count,) = struct.unpack_from("<I", data)
        records = np.frombuffer(data, dtype=np.dtype([("box", "<f4", 5), ("cls", "<i4")]), count=count, offset=4)
        return np.concatenate([records["box"], records["cls"][:, None].astype(np.float32)], axis=1)

    def preprocess(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, dict]:
        """An RGB888 frame (h, w, 3) -> the int8 NHWC input (imgsz, imgsz, 3) and the letterbox."""
        frame = np.ascontiguousarray(frame_rgb, dtype=np.uint8)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.nbytes > MAX_FRAME_BYTES:
            raise InputError(f"the harness takes an RGB888 frame of up to {MAX_FRAME_BYTES} bytes, "
                             f"got shape {frame.shape}")
        h, w = frame.shape[:2]
        data = self._run(struct.pack("<IIiii", MAGIC_REQUEST, MODE_PREPROCESS, w, h, w * 3) + frame.tobytes())
        ratio, pad_x, pad_y = struct.unpack_from("<fii", data)
        size = self.config["DETECTOR_IMGSZ"]
        tensor = np.frombuffer(data, dtype=np.int8, count=size * size * 3, offset=12).reshape(size, size, 3)
        return tensor, {"ratio": ratio, "pad_x": pad_x, "pad_y": pad_y}

    def model(self) -> tuple[int, bytes, int]:
        """The linked model array as the MCU sees it: (address, bytes, sizeof(detector_workspace_t))."""
        data = self._run(struct.pack("<II", MAGIC_REQUEST, MODE_MODEL))
        address, length, workspace = struct.unpack_from("<III", data)
        return address, data[12:12 + length], workspace


# The memory map of mps2-an386 and mps2-an500: code and initialised data are loaded by qemu straight into the
# SSRAM at 0 (no copy from flash needed), zero-initialised data and the stack live in the SSRAM at 0x20000000.
LINKER_SCRIPT = """\
ENTRY(harness_reset)
MEMORY
{{
  CODE (rwx) : ORIGIN = 0x00000000, LENGTH = 4M
  RAM (rw)   : ORIGIN = 0x20000000, LENGTH = 4M
}}
SECTIONS
{{
  .vectors : {{ KEEP(*(.vectors)) }} > CODE
  .text : {{ *(.text*) *(.rodata*) . = ALIGN(8); }} > CODE
  .ARM.exidx : {{ *(.ARM.exidx*) }} > CODE
  .data : {{ *(.data*) . = ALIGN(8); }} > CODE
  .bss (NOLOAD) : {{ __bss_start = .; *(.bss*) *(COMMON) . = ALIGN(8); __bss_end = .; end = .; }} > RAM
  __stack_top = ORIGIN(RAM) + LENGTH(RAM);
  ASSERT(__bss_end <= __stack_top - {stack}, "harness buffers overlap the stack")
}}
"""


HARNESS_C = r"""/* Emulation harness for the generated detector (edge-deploy targets/stm32/emulate.py).
 * Reads request.bin, runs one detector function, writes response.bin, exits qemu. */
#include <stdint.h>
#include <string.h>

#include "detector.h"
#include "model_data.h"

/* ARM semihosting operations (the host side is qemu's -semihosting-config target=native). */
#define SYS_OPEN 0x01
#define SYS_CLOSE 0x02
#define SYS_WRITE0 0x04
#define SYS_WRITE 0x05
#define SYS_READ 0x06
#define SYS_FLEN 0x0C
#define SYS_EXIT 0x18
#define EXIT_OK 0x20026u     /* ADP_Stopped_ApplicationExit: qemu exits with status 0 */
#define EXIT_ERROR 0x20023u  /* ADP_Stopped_RunTimeErrorUnknown: status 1 */

#define MAGIC_REQUEST 0x31484445u
#define MAGIC_RESPONSE 0x31524445u
#define MAX_FRAME_BYTES (1u << 20)
#define BOX_VALUES ((uint32_t)DETECTOR_NUM_ANCHORS * 4u * DETECTOR_REG_MAX)
#define CLS_VALUES ((uint32_t)DETECTOR_NUM_ANCHORS * DETECTOR_NUM_CLASSES)
#define FLOAT_BYTES ((BOX_VALUES + CLS_VALUES) * 4u)
#define REQUEST_BYTES (32u + (FLOAT_BYTES > MAX_FRAME_BYTES ? FLOAT_BYTES : MAX_FRAME_BYTES))
#define RESPONSE_BYTES (16u + (uint32_t)DETECTOR_INPUT_BYTES + DETECTOR_MAX_CANDIDATES * 24u)

static uint32_t request_words[REQUEST_BYTES / 4u + 1u];
static uint32_t response_words[RESPONSE_BYTES / 4u + 1u];
static detector_workspace_t workspace;
static detector_detection_t detections[DETECTOR_MAX_CANDIDATES];

static int semihost(int op, const void *arg)
{
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static void finish(uint32_t reason, const char *message)
{
    if (message != NULL) {
        semihost(SYS_WRITE0, message);
    }
    semihost(SYS_EXIT, (const void *)(uintptr_t)reason);
    for (;;) {
    }
}

static int open_file(const char *name, int mode)
{
    uint32_t args[3];
    args[0] = (uint32_t)(uintptr_t)name;
    args[1] = (uint32_t)mode;
    args[2] = (uint32_t)strlen(name);
    return semihost(SYS_OPEN, args);
}

static uint32_t read_request(void)
{
    uint32_t args[3];
    int handle = open_file("request.bin", 1 /* rb */), length;
    if (handle < 0) {
        finish(EXIT_ERROR, "harness: cannot open request.bin\n");
    }
    args[0] = (uint32_t)handle;
    length = semihost(SYS_FLEN, args);
    if (length < 8 || (uint32_t)length > sizeof(request_words)) {
        finish(EXIT_ERROR, "harness: request.bin has a bad size\n");
    }
    args[1] = (uint32_t)(uintptr_t)request_words;
    args[2] = (uint32_t)length;
    if (semihost(SYS_READ, args) != 0) {
        finish(EXIT_ERROR, "harness: short read of request.bin\n");
    }
    semihost(SYS_CLOSE, args);
    return (uint32_t)length;
}

static void write_response(const void *extra, uint32_t extra_length, uint32_t length)
{
    uint32_t args[3];
    int handle = open_file("response.bin", 5 /* wb */);
    if (handle < 0) {
        finish(EXIT_ERROR, "harness: cannot open response.bin\n");
    }
    args[0] = (uint32_t)handle;
    args[1] = (uint32_t)(uintptr_t)response_words;
    args[2] = length;
    if (semihost(SYS_WRITE, args) != 0) {
        finish(EXIT_ERROR, "harness: short write of response.bin\n");
    }
    if (extra_length > 0) {
        args[1] = (uint32_t)(uintptr_t)extra;
        args[2] = extra_length;
        if (semihost(SYS_WRITE, args) != 0) {
            finish(EXIT_ERROR, "harness: short write of response.bin\n");
        }
    }
    semihost(SYS_CLOSE, args);
}

static uint32_t write_detections(uint8_t *out, int count)
{
    int i;
    uint32_t n = (uint32_t)count;
    memcpy(out, &n, 4);
    for (i = 0; i < count; ++i) {
        memcpy(out + 4 + 24 * (uint32_t)i, &detections[i], 24);
    }
    return 4u + 24u * n;
}

static void harness_main(void)
{
    const uint8_t *request = (const uint8_t *)request_words;
    uint8_t *response = (uint8_t *)response_words;
    uint32_t length = read_request(), mode, body = 0;
    int32_t status = 0;
    if (request_words[0] != MAGIC_REQUEST) {
        finish(EXIT_ERROR, "harness: request.bin has no magic\n");
    }
    mode = request_words[1];
    if (mode == 1 || mode == 2) {
        detector_params_t params;
        memcpy(&params, request + 8, sizeof(params));
        if (mode == 1 && length == 24u + BOX_VALUES + CLS_VALUES) {
            status = detector_decode_int8((const int8_t *)(request + 24), (const int8_t *)(request + 24 + BOX_VALUES),
                                          &params, &workspace, detections, DETECTOR_MAX_CANDIDATES);
        } else if (mode == 2 && length == 24u + 4u * (BOX_VALUES + CLS_VALUES)) {
            status = detector_decode_float((const float *)(request + 24),
                                           (const float *)(request + 24 + 4u * BOX_VALUES), &params, &workspace,
                                           detections, DETECTOR_MAX_CANDIDATES);
        } else {
            finish(EXIT_ERROR, "harness: decode request of the wrong size\n");
        }
        if (status >= 0) {
            body = write_detections(response + 8, status);
        }
    } else if (mode == 3) {
        int32_t shape[3];
        detector_letterbox_t letterbox;
        memcpy(shape, request + 8, sizeof(shape));
        if ((uint64_t)shape[1] * (uint32_t)shape[2] + 20u != length) {
            finish(EXIT_ERROR, "harness: preprocess request of the wrong size\n");
        }
        status = detector_preprocess_rgb888(request + 20, shape[0], shape[1], shape[2],
                                            (int8_t *)(response + 20), &letterbox);
        memcpy(response + 8, &letterbox.ratio, 4);
        memcpy(response + 12, &letterbox.pad_x, 4);
        memcpy(response + 16, &letterbox.pad_y, 4);
        body = 12u + (uint32_t)DETECTOR_INPUT_BYTES;
    } else if (mode == 4) {
        uint32_t fields[3];
        fields[0] = (uint32_t)(uintptr_t)g_detector_model_data;
        fields[1] = g_detector_model_data_len;
        fields[2] = (uint32_t)sizeof(detector_workspace_t);
        memcpy(response + 8, fields, sizeof(fields));
        response_words[0] = MAGIC_RESPONSE;
        response_words[1] = 0;
        write_response(g_detector_model_data, g_detector_model_data_len, 8u + sizeof(fields));
        return;
    } else {
        finish(EXIT_ERROR, "harness: unknown mode\n");
    }
    response_words[0] = MAGIC_RESPONSE;
    memcpy(response + 4, &status, 4);
    write_response(NULL, 0, 8u + (status >= 0 ? body : 0u));
}

extern uint32_t __bss_start, __bss_end, __stack_top;

void harness_reset(void);
void harness_fault(void);

void harness_reset(void)
{
    uint32_t *word;
    /* CP10 and CP11 full access: the FPU is off at reset, and the first float instruction
     * would fault. */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    for (word = &__bss_start; word < &__bss_end; ++word) {
        *word = 0;
    }
    harness_main();
    finish(EXIT_OK, NULL);
}

void harness_fault(void)
{
    finish(EXIT_ERROR, "harness: fault\n");
}

/* Initial stack pointer, reset, NMI, and the four fault handlers. */
__attribute__((section(".vectors"), used)) static const uintptr_t vectors[7] = {
    (uintptr_t)&__stack_top,   (uintptr_t)harness_reset, (uintptr_t)harness_fault, (uintptr_t)harness_fault,
    (uintptr_t)harness_fault, (uintptr_t)harness_fault, (uintptr_t)harness_fault,
};
"""


# Firmware for the emulated board's UART: serial_probe.c behind the CMSDK APB UART0 of mps2-an386/an500.
SERIAL_BOARD_C = r"""/* Emulated board for the serial transport (edge-deploy targets/stm32/emulate.py). */
#include <stddef.h>
#include <stdint.h>

#include "detector.h"
#include "serial_probe.h"

#define UART0 0x40004000u
#define UART_DATA (*(volatile uint32_t *)(UART0 + 0x00u))
#define UART_STATE (*(volatile uint32_t *)(UART0 + 0x04u))
#define UART_CTRL (*(volatile uint32_t *)(UART0 + 0x08u))
#define UART_BAUDDIV (*(volatile uint32_t *)(UART0 + 0x10u))
#define UART_TX_FULL 1u
#define UART_RX_FULL 2u
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SYSCLK_HZ 25000000u /* the MPS2 boards' core clock, which SysTick counts */
#define BOX_VALUES ((uint32_t)DETECTOR_NUM_ANCHORS * 4u * DETECTOR_REG_MAX)
#define CLS_VALUES ((uint32_t)DETECTOR_NUM_ANCHORS * DETECTOR_NUM_CLASSES)

static int8_t box[BOX_VALUES];
static int8_t cls[CLS_VALUES];
static detector_workspace_t workspace;
static detector_detection_t found[DETECTOR_MAX_CANDIDATES];
static serial_probe_t probe;
static uint32_t last_count, elapsed;

static void uart_write(void *context, const char *text, size_t length)
{
    (void)context;
    while (length-- > 0u) {
        while (UART_STATE & UART_TX_FULL) {
        }
        UART_DATA = (uint8_t)*text++;
    }
}

/* SysTick counts down 24 bits; extended to a 32-bit up-counter (read often enough not to miss a wrap). */
static uint32_t ticks(void *context)
{
    uint32_t now = SYST_CVR & 0xFFFFFFu;
    (void)context;
    elapsed += (last_count - now) & 0xFFFFFFu;
    last_count = now;
    return elapsed;
}

static int invoke(void *context)
{
    const detector_params_t params = DETECTOR_PARAMS_DEFAULT;
    (void)context;
    return detector_decode_int8(box, cls, &params, &workspace, found, DETECTOR_MAX_CANDIDATES) < 0 ? -1 : 0;
}

static serial_probe_port_t port = {uart_write, ticks, SYSCLK_HZ, invoke, "qemu mps2 (emulated)",
                                   "detector.c decode + NMS standing in for TFLM", 0, NULL};

extern uint32_t __bss_start, __bss_end, __stack_top;
void harness_reset(void);
void board_fault(void);

void harness_reset(void)
{
    uint32_t *word, i, state = 12345u;
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* FPU on */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    for (word = &__bss_start; word < &__bss_end; ++word) {
        *word = 0;
    }
    for (i = 0; i < BOX_VALUES + CLS_VALUES; ++i) {
        state = state * 1664525u + 1013904223u;
        if (i < BOX_VALUES) {
            box[i] = (int8_t)(state >> 24);
        } else {
            cls[i - BOX_VALUES] = (int8_t)(state >> 24);
        }
    }
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 5u; /* enabled, core clock, no interrupt */
    last_count = SYST_CVR & 0xFFFFFFu;
    UART_BAUDDIV = SYSCLK_HZ / 115200u;
    UART_CTRL = 3u; /* TX and RX enabled */
    serial_probe_init(&probe, &port);
    for (;;) {
        if (UART_STATE & UART_RX_FULL) {
            serial_probe_feed(&probe, (uint8_t)UART_DATA);
        }
        (void)ticks(NULL);
    }
}

void board_fault(void)
{
    for (;;) {
    }
}

__attribute__((section(".vectors"), used)) static const uintptr_t vectors[7] = {
    (uintptr_t)&__stack_top, (uintptr_t)harness_reset, (uintptr_t)board_fault, (uintptr_t)board_fault,
    (uintptr_t)board_fault, (uintptr_t)board_fault, (uintptr_t)board_fault,
};
"""
