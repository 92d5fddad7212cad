/* The book's widgets typeset their labels with MathJax 2's API (MathJax.Hub.Queue), as
 * @jupyter-widgets/html-manager does when it has no typesetter; the book loads MathJax 3, which has no Hub.
 * Give MathJax 3 a small Hub.Queue that forwards ["Typeset", hub, element] jobs to MathJax.typesetPromise.
 * Loaded before the widget embedder, which renders on window "load", after MathJax 3 has replaced its
 * configuration object (Sphinx loads MathJax with "defer"). */
(function () {
  "use strict";
  function typeset(element) {
    var mj = window.MathJax;
    var elements = element ? [element] : undefined;
    var ready = mj && mj.startup && mj.startup.promise ? mj.startup.promise : Promise.resolve();
    ready.then(function () {
      if (mj.typesetPromise) { return mj.typesetPromise(elements); }
    }).catch(function (err) { console.warn("MathJax could not typeset a widget label", err); });
  }
  function addHub() {
    var mj = window.MathJax;
    if (mj && typeof mj === "object" && !mj.Hub) {
      mj.Hub = { Queue: function (job) { typeset(Array.isArray(job) ? job[2] : undefined); } };
    }
  }
  document.addEventListener("DOMContentLoaded", addHub);
  window.addEventListener("load", addHub, { capture: true });
})();
