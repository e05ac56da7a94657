/* Decode one rectangle of a JPEG with libjpeg-turbo: the pixels of the rows and columns a crop
 * needs, not the whole image (images.decode_jpeg_region, transforms.CropViews).
 *
 * libjpeg-turbo (>= 1.5) can skip rows (jpeg_skip_scanlines: no IDCT, upsampling or colour
 * conversion for them) and decode a band of columns (jpeg_crop_scanline: its left edge moved
 * down to an iMCU boundary), and stops after the last row asked for. Inside the rectangle the
 * pixels are those of the whole-image decode, one pixel in from its edges (where the chroma
 * upsampling sees the rectangle's edge as the image's): the caller pads the rectangle.
 * No maintained Python package exposes these calls (TurboJPEG's own cropped decode needs
 * libjpeg-turbo 3, which Debian 12 does not ship), hence this small module. Warnings on damaged
 * data are errors, as simplejpeg's strict mode has them: the caller then decodes the whole image
 * with its other decoders. The GIL is released while libjpeg decodes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>

#include <jpeglib.h>

struct region_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct region_error *err = (struct region_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) /* a warning: corrupt data libjpeg would paper over */
        on_error(cinfo);
}

PyDoc_STRVAR(decode_doc,
"decode(data, gray, shrink, full_height, full_width, top, left, height, width)\n"
"-> (pixels: bytearray, left: int, width: int)\n\n"
"Rows top..top+height-1 of a luma-chroma or gray JPEG decoded at 1/shrink in the DCT (1, 2, 4\n"
"or 8), columns from ``left`` (moved down to an iMCU boundary: the returned left) for at least\n"
"``width``, as uint8 height x width x channels (3, RGB; 1 where ``gray``). full_height and\n"
"full_width are the decoded image's size the caller expects at that scale. ValueError where\n"
"libjpeg stops or warns, the colour space is not YCbCr or gray, the size differs, or the\n"
"rectangle does not fit.");

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int gray, shrink, full_height, full_width, top, left, height, width;
    if (!PyArg_ParseTuple(args, "y*piiiiiii", &data, &gray, &shrink, &full_height, &full_width,
                          &top, &left, &height, &width))
        return NULL;

    struct jpeg_decompress_struct cinfo;
    struct region_error err;
    PyObject *volatile out = NULL;
    PyThreadState *volatile unlocked = NULL;
    const char *volatile problem = NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    if (setjmp(err.jump)) {
        if (unlocked)
            PyEval_RestoreThread(unlocked);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE)
        problem = "colour space is not YCbCr or gray";
    else if (shrink != 1 && shrink != 2 && shrink != 4 && shrink != 8)
        problem = "shrink is not 1, 2, 4 or 8";
    if (!problem) {
        cinfo.out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
        cinfo.scale_num = 1;
        cinfo.scale_denom = (unsigned int)shrink;
        jpeg_start_decompress(&cinfo);
        if ((int)cinfo.output_height != full_height || (int)cinfo.output_width != full_width)
            problem = "decoded size differs from the size expected";
        else if (top < 0 || left < 0 || height < 1 || width < 1 || top + height > full_height ||
                 left + width > full_width)
            problem = "rectangle outside the image";
    }
    if (problem) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    JDIMENSION x = (JDIMENSION)left, w = (JDIMENSION)width;
    jpeg_crop_scanline(&cinfo, &x, &w);
    const size_t stride = (size_t)w * (size_t)cinfo.output_components;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(stride * (size_t)height));
    if (!out) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);
    unlocked = PyEval_SaveThread();
    if (top > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    for (int row = 0; row < height;) {
        JSAMPROW rows[16];
        int n = height - row < 16 ? height - row : 16;
        for (int i = 0; i < n; i++)
            rows[i] = pixels + (size_t)(row + i) * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)n);
        if (got == 0) { /* suspended: the data ran out without an error */
            snprintf(err.message, sizeof err.message, "no more rows after %d of %d", row, height);
            longjmp(err.jump, 1);
        }
        row += (int)got;
    }
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(unlocked);
    unlocked = NULL;
    PyBuffer_Release(&data);
    return Py_BuildValue("(NII)", out, (unsigned int)x, (unsigned int)w);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg_region",
    "A rectangle of a JPEG decoded by libjpeg-turbo without the rest (see decode).", -1, methods,
};

PyMODINIT_FUNC PyInit__jpeg_region(void) {
    return PyModule_Create(&module);
}
